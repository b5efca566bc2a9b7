import json
import subprocess
import sys

from mixcpt.cli import main


def test_data_stage_from_the_command_line(tmp_path, tiny_model_dir):
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20))
    )
    (tmp_path / "c.yaml").write_text(
        "model: {path: ./tiny-llama}\ndata: {domain: [{path: d.jsonl}], block_size: 16}\n"
    )
    assert main(["data", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "data" / "mix" / "input_ids.npy").exists()
    assert "data" in json.loads((tmp_path / "run" / "results.json").read_text())


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "model: {path: m}\ndata: {domain: [{path: d.txt}]}\nbogus: 1\n"
    )
    (tmp_path / "afile").write_text("")
    for args, needle in [
        (
            ["data", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "run")],
            "bogus: unknown key",
        ),
        (
            ["data", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "run")],
            "does not exist",
        ),
        (
            ["data", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "afile")],
            "must be a folder",
        ),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "mixcpt.cli", *args], capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
