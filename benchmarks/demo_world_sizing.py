"""How well stage 1 teaches the demo's domain, for one choice of world, base and stage-1 sizes.

Builds the demo world and its base model at the given sizes (starting from the demo's own "default"
or "quick" sizes and changing the keys given), then trains stage 1 of each arm ("mixcpt": the
demo's D_MIX with LSSD + CE; "traditional": CE on the domain corpus) through the pipeline's own
stages, and scores held-out domain multiple choice and general multiple choice (plain prompts, as
the evaluation stage scores stage-1 models) on the base and every `--eval-every` steps of each
arm. Prints one JSON line per arm with the sizes, the base's time, the arm's training wall and CPU
time (scoring excluded) and the curve. Everything is written under --output (reused: a base built
from the same world and recipe is not rebuilt).

    OMP_NUM_THREADS=1 python benchmarks/demo_world_sizing.py --output /tmp/sz
    ... --from quick --world domain_planets=40,docs_per_domain_planet=10 \\
        --base hidden=128,epochs=30 --steps 600 --lr 2e-3 --batch 16 --eval-every 100
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from mixcpt.config import config_from_dict
from mixcpt.data.render import render_plain_prompt
from mixcpt.demo import base_model, world
from mixcpt.demo.run import demo_config
from mixcpt.evaluate.scoring import mean_scores, multiple_choice_correct
from mixcpt.pipeline import run_stage
from mixcpt.rundir import RunDir
from mixcpt.train import stage as cpt_stage


def overrides(text: str, cls) -> dict:
    """ "key=value,key=value" -> {key: value} typed like the dataclass `cls`'s fields."""
    types = {f.name: f.type for f in fields(cls)}
    out = {}
    for pair in filter(None, text.split(",")):
        key, value = pair.split("=")
        if key not in types:
            raise SystemExit(f"unknown {cls.__name__} key {key!r}; keys: {sorted(types)}")
        out[key] = float(value) if types[key] == "float" else int(value)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class Scorer:
    """Domain and general multiple-choice acc_norm of a model, plain prompts."""

    def __init__(self, files: world.WorldFiles, template):
        self.benches = {
            "domain_mc": read_jsonl(files.bench_domain_mc),
            "general_mc": read_jsonl(files.bench_general_mc),
        }
        self.template = template

    @torch.no_grad()
    def __call__(self, model, tokenizer) -> dict[str, float]:
        was_training = model.training
        model.eval()
        scores = {}
        for name, items in self.benches.items():
            prompts = [render_plain_prompt(i["question"], "", self.template) for i in items]
            mc = mean_scores(
                multiple_choice_correct(model, tokenizer, prompts, items, batch_size=64)
            )
            scores[name] = round(mc["acc_norm"], 3)
        model.train(was_training)
        return scores


class CurveCallback(TrainerCallback):
    """Scores the model every `every` steps and at the end; keeps the time spent scoring, so that
    it can be taken out of the training time."""

    def __init__(self, scorer: Scorer, tokenizer, every: int):
        self.scorer, self.tokenizer, self.every = scorer, tokenizer, every
        self.curve: list[dict] = []
        self.wall = self.cpu = 0.0

    def _score(self, model, step: int) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.curve.append({"step": step, **self.scorer(model, self.tokenizer)})
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        print(json.dumps({"progress": self.curve[-1]}), flush=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self._score(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._score(model, state.global_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--from", dest="start", choices=["default", "quick"], default="default")
    parser.add_argument("--world", default="", help="WorldSize overrides: key=value,...")
    parser.add_argument("--base", default="", help="BaseRecipe overrides: key=value,...")
    parser.add_argument("--steps", type=int, help="stage-1 max_steps (default: the demo's)")
    parser.add_argument("--lr", type=float, help="stage-1 learning rate (default: the demo's)")
    parser.add_argument("--batch", type=int, help="stage-1 batch size (default: the demo's)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--arms", default="mixcpt,traditional")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()

    # the sizes under test replace the --from entry of the demo's size tables (in this process
    # only), so that a base built here with the demo's own sizes is the one `mixcpt demo` reuses
    sz = replace(world.SIZES[a.start], **overrides(a.world, world.WorldSize))
    recipe = replace(base_model.RECIPES[a.start], **overrides(a.base, base_model.BaseRecipe))
    world.SIZES[a.start], base_model.RECIPES[a.start] = sz, recipe

    run = RunDir(a.output)
    run.root.mkdir(parents=True, exist_ok=True)
    files = world.write_world(run.root / "world", seed=a.seed, size=a.start)
    wall, cpu = time.perf_counter(), time.process_time()
    base_model.build_base_model(files, run.base, seed=a.seed, size=a.start)
    base_record = json.loads((run.base / base_model.MARKER).read_text())
    base_times = {
        "wall_s": round(time.perf_counter() - wall, 1),  # ~0 when the cached base was reused
        "cpu_s": round(time.process_time() - cpu, 1),
        "built_in_s": base_record["seconds"],
        "parameters": base_record["parameters"],
        "train_tokens": base_record["train_tokens"],
    }

    raw = demo_config(run, quick=a.start == "quick", seed=a.seed)
    training = raw["cpt"]["training"]
    for key, value in (
        ("max_steps", a.steps),
        ("learning_rate", a.lr),
        ("per_device_batch_size", a.batch),
    ):
        if value is not None:
            training[key] = value
    training["save_steps"] = training["max_steps"]  # no checkpoints in between: they cost time
    cfg = config_from_dict(raw, root=run.root, source=str(run.root / "config.yaml"))
    run_stage("data", cfg, run)

    scorer = Scorer(files, cfg.data.template)
    tokenizer = AutoTokenizer.from_pretrained(run.base)
    base_scores = scorer(AutoModelForCausalLM.from_pretrained(run.base), tokenizer)
    domain_docs = read_jsonl(files.domain)
    domain_tokens = sum(
        len(ids) for ids in tokenizer([d["text"] for d in domain_docs])["input_ids"]
    )

    make_trainer = cpt_stage.cpt_trainer
    for arm in a.arms.split(","):
        callback = CurveCallback(scorer, tokenizer, a.eval_every)

        def with_curve(*args, callback=callback, **kwargs):
            trainer = make_trainer(*args, **kwargs)
            trainer.add_callback(callback)
            return trainer

        cpt_stage.cpt_trainer = with_curve
        wall, cpu = time.perf_counter(), time.process_time()
        run_stage("cpt", cfg, run, arm=arm, force=True)
        cpt_stage.cpt_trainer = make_trainer
        print(
            json.dumps(
                {
                    "arm": arm,
                    "world": asdict(sz),
                    "base": asdict(recipe),
                    "base_model": base_times,
                    "domain_docs": len(domain_docs),
                    "domain_tokens": domain_tokens,
                    "stage1": {
                        "steps": training["max_steps"],
                        "lr": training["learning_rate"],
                        "batch": training["per_device_batch_size"],
                        "block_size": raw["data"]["block_size"],
                        "train_wall_s": round(time.perf_counter() - wall - callback.wall, 1),
                        "train_cpu_s": round(time.process_time() - cpu - callback.cpu, 1),
                    },
                    "threads": torch.get_num_threads(),
                    "base_scores": base_scores,
                    "curve": callback.curve,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
