import json

import pytest

from mixcpt.evaluate.scoring import loglikelihoods, mean_scores, multiple_choice_correct

ITEMS = [
    {"question": "Where was Alice born?", "choices": ["Paris", "London town", "Vega"], "answer": 0},
    {
        "question": "What is two plus two?",
        "choices": ["four", "five", "the planet Zorbax"],
        "answer": 2,
    },
    {"question": "Who works at Acme?", "choices": ["Bob", "Alice", "nobody at all"], "answer": 1},
]

TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_local_task_agrees_with_our_scoring(tmp_path, tiny_model, tiny_tokenizer):
    pytest.importorskip("lm_eval")
    from mixcpt.errors import ConfigError
    from mixcpt.evaluate.lm_eval_bridge import lm_eval_scores, run_lm_eval

    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))

    output = run_lm_eval(
        tiny_model,
        tiny_tokenizer,
        ["tiny_mc"],
        str(tmp_path / "tasks"),
        batch_size=4,
        log_samples=True,
    )
    samples = sorted(output["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    theirs = [ll for s in samples for ll, _greedy in s["filtered_resps"]]
    ours = loglikelihoods(
        tiny_model,
        tiny_tokenizer,
        [(it["question"], " " + c) for it in ITEMS for c in it["choices"]],
    )
    assert ours == pytest.approx(theirs, abs=1e-4)

    scores = lm_eval_scores(output)["tiny_mc"]
    mine = mean_scores(
        multiple_choice_correct(tiny_model, tiny_tokenizer, [it["question"] for it in ITEMS], ITEMS)
    )
    assert scores["acc"] == pytest.approx(mine["acc"], abs=1e-4)
    assert scores["acc_norm"] == pytest.approx(mine["acc_norm"], abs=1e-4)

    with pytest.raises(ConfigError, match="no_such_task"):
        run_lm_eval(tiny_model, tiny_tokenizer, ["no_such_task"], str(tmp_path / "tasks"))
