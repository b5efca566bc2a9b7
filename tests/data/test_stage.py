import json
import os

import numpy as np
import pytest

from mixcpt.data.packing import IGNORE_INDEX, PackedBlocks
from mixcpt.data.stage import run_data
from mixcpt.errors import ConfigError, InputError
from mixcpt.rundir import RunDir
from mixcpt.stage_inputs import config_and_files


def stream_docs(folder):
    """Split a packed stream back into documents at EOS (token 2 in the tiny tokenizer)."""
    blocks = PackedBlocks(folder)
    flat = np.load(folder / "input_ids.npy").reshape(-1)[: blocks.n_tokens]
    cuts = np.flatnonzero(flat == 2) + 1
    return [tuple(d) for d in np.split(flat, cuts) if len(d)]


def jsonl_documents(path, tokenizer) -> list[tuple]:
    """Every document of a jsonl source of texts, as tokenizer(text) + EOS."""
    lines = path.read_text().splitlines()
    return [tuple(tokenizer(json.loads(t)["text"]).input_ids + [2]) for t in lines]


def domain_documents(tmp_path, tokenizer) -> list[tuple]:
    """Every document of the domain source, as tokenizer(text) + EOS."""
    return jsonl_documents(tmp_path / "domain.jsonl", tokenizer)


def test_packing_loses_and_duplicates_no_token(make_config, tmp_path, tiny_tokenizer):
    cfg = make_config(weights=(1.0, 0.0, 0.0))
    stats = run_data(cfg, RunDir(tmp_path / "run"))
    # D_MIX of the domain alone: every domain document exactly once, and D_K the same
    expected = sorted(domain_documents(tmp_path, tiny_tokenizer))
    assert sorted(stream_docs(tmp_path / "run" / "data" / "mix")) == expected
    assert sorted(stream_docs(tmp_path / "run" / "data" / "domain")) == expected
    assert stats["domain"]["n_tokens"] == sum(len(d) for d in expected)


def test_d_k_is_the_domain_part_of_d_mix_in_its_order_with_its_repeats(
    make_config, tmp_path, tiny_tokenizer
):
    # the domain's share needs more than the domain holds: oversampling repeats its documents
    cfg = make_config(weights=(0.8, 0.1, 0.1), oversample=True)
    stats = run_data(cfg, RunDir(tmp_path / "run"))
    domain = set(domain_documents(tmp_path, tiny_tokenizer))
    in_mix = [d for d in stream_docs(tmp_path / "run" / "data" / "mix") if d in domain]
    assert len(in_mix) > len(domain)  # some were drawn twice
    assert stream_docs(tmp_path / "run" / "data" / "domain") == in_mix
    drawn = stats["mix"]["sources"]["domain.jsonl"]["tokens"]
    assert stats["domain"]["n_tokens"] == drawn == sum(len(d) for d in in_mix)


def test_blocks_have_labels_for_every_real_token_and_positions_reset_per_document(
    make_config, tmp_path
):
    run = RunDir(tmp_path / "run")
    run_data(make_config(), run)
    blocks = PackedBlocks(run.data / "mix")
    for i in range(len(blocks)):
        item = blocks[i]
        ids, pos = item["input_ids"].numpy(), item["position_ids"].numpy()
        # every real token is a target but a document's first (the previous EOS predicts nothing)
        real = i * blocks.block_size + np.arange(blocks.block_size) < blocks.n_tokens
        expected = np.where((pos == 0) | ~real, IGNORE_INDEX, ids)
        assert (item["labels"].numpy() == expected).all()
        if not real.all():  # the padded tail of the last block
            continue
        assert pos[0] == 0
        starts = np.flatnonzero(pos == 0)
        # every restart but the block's first follows an EOS: documents never share positions
        assert all(ids[s - 1] == 2 for s in starts[1:])
        assert all(pos[j] == pos[j - 1] + 1 for j in range(1, len(pos)) if j not in set(starts))


def test_pool_holds_rendered_general_samples_and_stats_are_written(make_config, tmp_path):
    run = RunDir(tmp_path / "run")
    stats = run_data(make_config(), run)
    rows = [
        json.loads(line)
        for line in (run.data / "pool" / "instructions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == stats["pool"]["instructions"] > 0
    translate = [r for r in rows if r["messages"][0]["content"].startswith("Translate")]
    if translate:  # when drawn, both instruction and input survive in the plain rendering
        assert (
            "Translate" in translate[0]["plain_prompt"]
            and "bonjour" in translate[0]["plain_prompt"]
        )
    prefs = [
        json.loads(line)
        for line in (run.data / "pool" / "preferences.jsonl").read_text().splitlines()
    ]
    assert {"chosen", "rejected", "plain_prompt", "messages"} <= prefs[0].keys()
    on_disk = json.loads((run.data / "data_stats.json").read_text())
    assert on_disk["mix"]["sources"].keys() == {
        "domain.jsonl",
        "instructions.jsonl",
        "preferences.jsonl",
    }
    assert run.read_results()["data"]["mix"] == on_disk["mix"]


def test_same_inputs_reuse_and_changed_inputs_rebuild(make_config, tmp_path, sources):
    run = RunDir(tmp_path / "run")
    run_data(make_config(), run)
    stamp = os.stat(run.data / "mix" / "input_ids.npy").st_mtime_ns
    run_data(make_config(), run)
    assert os.stat(run.data / "mix" / "input_ids.npy").st_mtime_ns == stamp
    with open(sources["domain"], "a") as f:
        f.write(json.dumps({"text": "A brand new planet document."}) + "\n")
    stats = run_data(make_config(), run)
    assert stats["domain"]["n_tokens"] > 0
    assert os.stat(run.data / "mix" / "input_ids.npy").st_mtime_ns != stamp


def test_same_seed_same_stream_other_seed_other_order(make_config, tmp_path):
    a, b = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    run_data(make_config(), a)
    run_data(make_config(), b)
    assert (
        np.load(a.data / "mix" / "input_ids.npy") == np.load(b.data / "mix" / "input_ids.npy")
    ).all()
    c = make_config()
    c.seed = 1
    run_data(c, RunDir(tmp_path / "c"))
    assert not np.array_equal(
        np.load(a.data / "mix" / "input_ids.npy"),
        np.load(tmp_path / "c" / "data" / "mix" / "input_ids.npy"),
    )


def test_bad_record_stops_with_file_and_line_and_leaves_no_output(make_config, tmp_path, sources):
    with open(sources["instructions"], "a") as f:
        f.write('{"instruction": "no output"}\n')
    run = RunDir(tmp_path / "run")
    with pytest.raises(InputError, match=r"instructions\.jsonl:\d+: missing field 'output'"):
        run_data(make_config(), run)
    assert not run.data.exists()
    assert not [p for p in run.root.iterdir() if p.name.startswith(".data")]


def test_shares_within_two_points_on_a_million_tokens(tmp_path, tok_dir):
    from mixcpt.config import config_from_dict

    rng = np.random.default_rng(0)
    words = np.array("the planet star orbit moon alpha beta gamma delta of and in".split())
    for name, n in (("a", 12000), ("b", 6000), ("c", 3000)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(
                    json.dumps({"text": " ".join(rng.choice(words, rng.integers(20, 120)))}) + "\n"
                )
    cfg = config_from_dict(
        {
            "model": {"path": str(tok_dir)},
            "data": {
                "domain": [
                    {"path": "a.jsonl", "weight": 2},
                    {"path": "b.jsonl", "weight": 1},
                    {"path": "c.jsonl", "weight": 1},
                ],
                "block_size": 512,
            },
        },
        root=tmp_path,
    )
    stats = run_data(cfg, RunDir(tmp_path / "run"))
    assert stats["available_tokens"] >= 1_000_000
    for src in stats["mix"]["sources"].values():
        assert abs(src["share"] - src["target_share"]) < 0.02


def test_weights_all_zero_or_negative_are_config_errors(make_config):
    with pytest.raises(ConfigError, match="all source weights are zero"):
        make_config(weights=(0, 0, 0))
    with pytest.raises(ConfigError, match=r"data\.domain\.0\.weight"):
        make_config(weights=(-1, 0.5, 0.5))


# ---- the replay stream D_R (mixcpt.data.replay) ----------------------------------------------


@pytest.fixture
def general_text(tmp_path):
    """A plain-text pre-training corpus, distinct from every domain document."""
    path = tmp_path / "general.jsonl"
    texts = [f"The river R{i} flows past the town T{i % 11} to the sea." for i in range(300)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_replay_stream_holds_d_k_in_its_order_and_the_configured_share_of_general_text(
    make_config, tmp_path, general_text, tiny_tokenizer
):
    cfg = make_config(replay=[{"path": str(general_text)}], replay_share=0.4, oversample=True)
    run = RunDir(tmp_path / "run")
    stats = run_data(cfg, run)
    replay = stream_docs(run.data / "replay")
    general = set(jsonl_documents(general_text, tiny_tokenizer))
    # the domain documents, in D_K's order with its repeats: the same domain tokens per pass
    assert [d for d in replay if d not in general] == stream_docs(run.data / "domain")
    replayed = [d for d in replay if d in general]
    tokens = sum(len(d) for d in replayed)
    assert tokens == stats["replay"]["replay_tokens"] > 0
    assert stats["replay"]["domain_tokens"] == stats["domain"]["n_tokens"]
    # the general share as asked, within the one document a draw may overshoot by
    longest = max(len(d) for d in general)
    assert abs(tokens - 0.4 / 0.6 * stats["domain"]["n_tokens"]) <= longest
    assert stats["replay"]["share"] == pytest.approx(0.4, abs=0.01)
    # interleaved, not appended: general text before the last domain document
    first_general = next(i for i, d in enumerate(replay) if d in general)
    assert first_general < max(i for i, d in enumerate(replay) if d not in general)
    # never in D_MIX, and in the results beside the other streams
    assert not general & set(stream_docs(run.data / "mix"))
    assert run.read_results()["data"]["replay"]["n_tokens"] == stats["replay"]["n_tokens"]


def test_replay_share_defaults_to_the_general_share_of_d_mix(make_config, tmp_path, general_text):
    cfg = make_config(replay=[{"path": str(general_text)}], oversample=True)
    stats = run_data(cfg, RunDir(tmp_path / "run"))
    general = sum(s["share"] for s in stats["mix"]["sources"].values() if s["group"] != "domain")
    assert stats["replay"]["target_share"] == pytest.approx(general)
    assert stats["replay"]["share"] == pytest.approx(general, abs=0.01)
    # so the replay stream is about D_MIX's size
    assert stats["replay"]["n_tokens"] == pytest.approx(stats["mix"]["n_tokens"], rel=0.02)


def test_replay_stream_is_bitwise_reproducible(make_config, tmp_path, general_text):
    cfg = make_config(replay=[{"path": str(general_text)}], oversample=True)
    streams = []
    for name in ("a", "b"):
        run = RunDir(tmp_path / name)
        run_data(cfg, run)
        streams.append((run.data / "replay" / "input_ids.npy").read_bytes())
    assert streams[0] == streams[1]
    other = RunDir(tmp_path / "other-seed")
    run_data(cfg.model_copy(update={"seed": 1}), other)
    assert np.load(other.data / "replay" / "input_ids.npy").tobytes() != streams[0]


def test_no_replay_stream_without_data_replay_and_its_sources_count_by_content(
    make_config, tmp_path, general_text
):
    run = RunDir(tmp_path / "run")
    stats = run_data(make_config(), run)
    assert "replay" not in stats and not (run.data / "replay").exists()
    # without a replay stream its settings are not among the data stage's inputs
    config, _ = config_and_files(make_config(), run, "data")
    assert not any(key.startswith("data.replay") for key in config)
    with_replay = make_config(replay=[{"path": str(general_text)}], replay_share=0.3)
    config, files = config_and_files(with_replay, run, "data")
    assert config["data.replay_share"] == 0.3
    before = files["data.replay[0].path"]
    general_text.write_text(general_text.read_text().replace("river", "brook"))
    assert config_and_files(with_replay, run, "data")[1]["data.replay[0].path"] != before


def test_a_replay_source_too_small_for_its_share_needs_oversample(
    make_config, tmp_path, general_text
):
    general_text.write_text(json.dumps({"text": "A short one."}) + "\n")
    cfg = make_config(replay=[{"path": str(general_text), "name": "tiny"}], replay_share=0.5)
    with pytest.raises(
        ConfigError,
        match="source 'tiny' holds 13 tokens but its share of replay_share needs .*oversample",
    ):
        run_data(cfg, RunDir(tmp_path / "run"))


def test_replay_without_general_mixture_needs_a_share(make_config, general_text):
    with pytest.raises(ConfigError, match="data: replay_share: D_MIX draws no general tokens"):
        make_config(weights=(1.0, 0.0, 0.0), replay=[{"path": str(general_text)}])
