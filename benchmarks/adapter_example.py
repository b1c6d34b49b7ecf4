"""The worked example of docs/adapter-rank.md: what full fine-tuning and LoRA learn, and a resize.

    python benchmarks/adapter_example.py                 # regenerates docs/adapter-rank.md (CPU)
    python benchmarks/adapter_example.py --steps 20 --out /tmp/example   # a quick rehearsal

GPT-2 small's config with random weights (seed 0), trained on the built-in Q/A set
(`lora_planner.measure.data`) with the harness's pieces: `measure.job.build_model`, our LoRA layer
(`measure.lora`, PEFT's default target c_attn), AdamW as in `measure/job.py`, fp32 on CPU. Three runs
from the same initial weights: full fine-tuning, LoRA r=8 and LoRA r=1. Then:

- the full update W_after - W_before, streamed from two safetensors checkpoints (`adapter diff`);
- the adapters' spectra from their factors (`adapter analyze`);
- the r=8 adapter resized (`adapter resize --energy 0.9` and `--rank 1`), loaded back into a fresh
  model by the harness (`measure.lora.load_adapter`) and evaluated: loss before and after resizing.
  PEFT loads the resized adapter too, and its logits are checked against the harness's.

Evaluation loss is the mean next-token loss over every window of the Q/A stream (the training data:
this is a memorisation task). Checkpoints go to --work (a temporary folder by default); the markdown,
the plot and a JSON of every number go to --out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.metadata
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_planner.adapter_rank import analyze_adapter, diff_checkpoints, resize_adapter
from lora_planner.measure import lora
from lora_planner.measure.data import token_stream
from lora_planner.measure.job import Job, build_model, model_spec
from lora_planner.measure.step import train_step
from lora_planner.reports.adapters import adapter_section, cumulative_energy_plot
from lora_planner.reports.markdown import code, image
from lora_planner.spectrum import Criterion

ROOT = Path(__file__).resolve().parent.parent


def eval_windows(seq_len: int) -> torch.Tensor:
    """Every non-overlapping window of the Q/A stream: (N, seq_len)."""
    stream = torch.tensor(token_stream("qa"), dtype=torch.long)
    n = stream.numel() // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor) -> float:
    model.eval()
    losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    model.train()
    return sum(losses) / len(losses)


def initial_model(settings: Job, base: Path | None = None):
    """The seeded initial model of every run (`measure.job.build_model`), or the weights saved in `base`."""
    model = build_model(model_spec(settings), settings)
    if base is not None:
        from safetensors.torch import load_model

        load_model(model, str(base))
    return model


def train(settings: Job, steps: int, base_path: Path | None = None):
    """Train from the seeded initial weights (saved to `base_path` first, when given); return
    (model, losses, seconds, trainable parameters)."""
    from lora_planner.measure.data import batches

    spec = model_spec(settings)
    model = initial_model(settings)
    if base_path is not None:
        save_weights(model, base_path)
    setup, run = settings.setup, settings.run
    if setup.method == "lora":
        lora.inject(model, setup.targets, setup.rank, run.alpha)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # foreach=False: the same AdamW arithmetic as the harness's, stepping tensor by tensor, so a full
    # fine-tune of 124M parameters stays near 2 GB on a shared machine.
    optimizer = torch.optim.AdamW(trainable, lr=run.lr, foreach=False)
    data = batches("qa", setup.batch_size, setup.seq_len, spec.vocab_size, run.seed)
    losses, start = [], time.perf_counter()
    for _, input_ids in zip(range(steps), data, strict=False):
        loss = train_step(model, optimizer, input_ids)
        losses.append(loss.item())
        if len(losses) % 10 == 0:
            print(f"  {setup.method} r={setup.rank}: step {len(losses)}, loss {losses[-1]:.3f}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    return model, losses, seconds, sum(p.numel() for p in trainable)


def save_weights(model, path: Path) -> Path:
    from safetensors.torch import save_model

    save_model(model, str(path))  # drops the tied lm_head copy of wte
    return path


def harness_loss(initial, adapter: Path, windows: torch.Tensor) -> float:
    model = copy.deepcopy(initial)
    lora.load_adapter(model, adapter)
    return eval_loss(model, windows)


def peft_agrees(initial, adapter: Path, windows: torch.Tensor) -> float:
    """Largest |logit difference| between PEFT and the harness on the resized adapter."""
    import peft

    ours = copy.deepcopy(initial)
    lora.load_adapter(ours, adapter)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(initial), str(adapter)).eval()
    with torch.no_grad():
        x = windows[:2]
        return float((ours.eval()(input_ids=x).logits - theirs(input_ids=x).logits).abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2",
                        help="Catalog name or config.json (a tiny config rehearses the script in seconds).")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on a shared machine one thread is the fastest")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--work", default=None, help="Folder for checkpoints (default: a temporary one).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="adapter-example-"))
    work.mkdir(parents=True, exist_ok=True)
    windows = eval_windows(args.seq_len)
    common = {"model": args.model, "seq_len": args.seq_len, "batch_size": args.batch_size, "data": "qa",
              "seed": 0}
    runs = {}

    full = Job.from_dict({"method": "full", "lr": args.full_lr, **common})
    base_path, tuned_path = work / "base.safetensors", work / "full.safetensors"
    model, losses, seconds, trainable = train(full, args.steps, base_path)
    save_weights(model, tuned_path)
    runs["full"] = {"trainable_params": trainable, "lr": args.full_lr, "first_loss": losses[0],
                    "last_loss": losses[-1], "eval_loss": eval_loss(model, windows), "seconds": seconds}
    del model
    initial = initial_model(full, base_path)
    base_loss = eval_loss(initial, windows)
    print(f"full: {runs['full']}", flush=True)

    for rank in (8, 1):
        settings = Job.from_dict({"method": "lora", "rank": rank, "alpha": 2.0 * rank, "lr": args.lora_lr,
                                  **common})
        model, losses, seconds, trainable = train(settings, args.steps)
        lora.save_adapter(model, work / f"lora-r{rank}", base_model="gpt2 (random init, seed 0)")
        runs[f"lora r={rank}"] = {"trainable_params": trainable, "lr": args.lora_lr, "alpha": 2.0 * rank,
                                  "first_loss": losses[0], "last_loss": losses[-1],
                                  "eval_loss": eval_loss(model, windows), "seconds": seconds}
        del model
        print(f"lora r={rank}: {runs[f'lora r={rank}']}", flush=True)

    # Paths in the page are the names inside --work, not this machine's temporary folder.
    names = {"base": base_path.name, "finetuned": tuned_path.name}
    diff_all = relabel(diff_checkpoints(base_path, tuned_path), names)
    diff_attn = relabel(diff_checkpoints(base_path, tuned_path, include=r"attn\.c_attn\.weight$"), names)
    r8, r1 = (relabel(analyze_adapter(work / name),
                      {"path": name, "weights": f"{name}/adapter_model.safetensors"})
              for name in ("lora-r8", "lora-r1"))
    print("analysed", flush=True)

    resizes = []
    for criterion in (Criterion("energy", 0.9), Criterion("energy", 0.5), Criterion("rank", 1)):
        target = work / f"lora-r8-{criterion.kind}-{criterion.value:g}"
        resized = resize_adapter(work / "lora-r8", criterion, target)
        resizes.append({
            "criterion": criterion.describe(),
            "command": f"lora-plan adapter resize lora-r8 --{criterion.kind.replace('_', '-')} "
                       f"{criterion.value:g}"
                       f" -o {target.name}",
            "ranks": sorted({x.new_rank for x in resized.layers}),
            "params": resized.params[1],
            "file_bytes": resized.file_bytes[1],
            "max_frobenius_error": max(x.frobenius_error for x in resized.layers),
            "eval_loss": harness_loss(initial, target, windows),
            "peft_max_logit_difference": peft_agrees(initial, target, windows),
        })
        print(resizes[-1], flush=True)

    series = [("full update, all 2-D tensors", diff_all), ("full update, attn.c_attn", diff_attn),
              ("LoRA r=8, c_attn", r8), ("LoRA r=1, c_attn", r1)]
    plot = cumulative_energy_plot(series, out / "adapter-rank-cumulative-energy.png")
    versions = {name: importlib.metadata.version(name)
                for name in ("torch", "transformers", "safetensors", "peft", "lora-plan")
                if _has(name)}
    provenance = {
        "command": shlex.join(["python", "benchmarks/adapter_example.py", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s), "
                   f"{platform.system()}, shared with other jobs",
        "python": platform.python_version(),
        "versions": versions,
        "settings": {"model": args.model, "steps": args.steps, "seq_len": args.seq_len,
                     "batch_size": args.batch_size,
                     "precision": "fp32", "optimizer": "AdamW (torch defaults but lr)", "seed": 0},
    }
    results = {"provenance": provenance, "base_eval_loss": base_loss, "runs": runs, "resizes": resizes,
               "analyses": {label: a.summary for label, a in series}}
    (out / "adapter-rank.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(out / "adapter-rank.md", results, series, plot)
    print(f"wrote {out / 'adapter-rank.md'}")
    return 0


def relabel(analysis, changes: dict):
    return dataclasses.replace(analysis, source={**analysis.source, **changes})


def _has(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def write_markdown(path: Path, results: dict, series, plot: Path) -> None:
    from tabulate import tabulate

    p = results["provenance"]
    runs = results["runs"]
    diff_all, diff_attn, r8, r1 = (a for _, a in series)

    def table(headers, rows):
        return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)

    run_rows = [["base (no training)", "-", "-", "-", "-", f"{results['base_eval_loss']:.3f}", "-"]]
    run_rows += [[name, f"{r['trainable_params']:,}", f"{r['lr']:g}", f"{r['first_loss']:.3f}",
                  f"{r['last_loss']:.3f}", f"{r['eval_loss']:.3f}", f"{r['seconds']:.0f}"]
                 for name, r in runs.items()]
    spectra_rows = []
    for label, a in series:
        s = a.summary["energy_rank"]
        spectra_rows.append([label, a.summary["layers"], *[f"{s[k]['median']:g} / {s[k]['max']}" for k in s],
                             a.summary["recommended_rank"]])
    resize_rows = [["none (r=8 as trained)", "8", f"{r8.summary['now']['params']:,}",
                    f"{r8.summary['now']['bytes']:,}", "0", f"{runs['lora r=8']['eval_loss']:.4f}", "-"]]
    resize_rows += [[code(x["command"]), ",".join(map(str, x["ranks"])), f"{x['params']:,}",
                     f"{x['file_bytes']:,}", f"{x['max_frobenius_error']:.3f}", f"{x['eval_loss']:.4f}",
                     f"{x['peft_max_logit_difference']:.1e}"] for x in results["resizes"]]
    full_attn = diff_attn.summary["energy_rank"]
    attn_shape = diff_attn.layers[0].shape
    text = [
        "# What did fine-tuning learn? A worked example of `lora-plan adapter`",
        "",
        f"{p['settings']['model']} ({runs['full']['trainable_params']:,} parameters, random initial weights "
        "from its config, seed 0) trained on the built-in Q/A set "
        f"for {p['settings']['steps']} steps of {p['settings']['batch_size']} x {p['settings']['seq_len']} "
        "tokens, three ways from the same initial weights: full fine-tuning, LoRA r=8 and LoRA r=1 on "
        "c_attn (PEFT's default target for GPT-2, alpha = 2r). Everything below comes from these runs.",
        "",
        f"Made by `{p['command']}` on {p['date']} ({p['machine']}, Python {p['python']}, "
        + ", ".join(f"{k} {v}" for k, v in p["versions"].items()) + "). All numbers are in "
        "`adapter-rank.json` beside this page.",
        "",
        "## The runs",
        "",
        f"Evaluation loss: mean next-token loss over every {p['settings']['seq_len']}-token window of the "
        "Q/A text (the training data: a memorisation task). Train seconds are wall time on a machine "
        "shared with other jobs.",
        "",
        table(["run", "trainable params", "lr", "first train loss", "last train loss", "eval loss",
               "train seconds"], run_rows),
        "",
        "## How low-rank were the updates?",
        "",
        "Energy rank at F: the fewest singular directions holding the share F of a layer's squared "
        "Frobenius norm. Median / max across layers.",
        "",
        table(["update", "layers", *[f"rank@{k} (median / max)" for k in diff_all.summary['energy_rank']],
               "recommended (rank@0.9, max)"], spectra_rows),
        "",
        image("cumulative energy per layer", plot, path),
        "",
        f"The full update of c_attn ({attn_shape[0]} x {attn_shape[1]}, rank up to {min(attn_shape)}) "
        "needs a median "
        f"{full_attn['0.9']['median']:g} directions for 90% of its energy "
        f"({100 * full_attn['0.9']['median_share_of_full_rank']:.0f}% of its full rank) and "
        f"{full_attn['0.99']['median']:g} for 99%. The adapters hold at most r directions by construction; "
        "their spectra show how many of those the training used.",
        "",
        "## Resizing the r=8 adapter",
        "",
        "Each resized adapter is loaded into a fresh copy of the initial model by the harness "
        "(`lora_planner.measure.lora.load_adapter`) and evaluated; PEFT loads the same folder "
        "(`PeftModel.from_pretrained`), and the last column is the largest logit difference between the two.",
        "",
        table(["resize", "ranks", "params", "file bytes", "max rel. Frobenius error", "eval loss",
               "PEFT vs harness"], resize_rows),
        "",
        "lora_alpha is kept; each layer's scaling becomes alpha/k at its new rank k and the factors "
        "absorb the change, so scaling·B·A is exactly the truncated update.",
        "",
        "## Reproduce with the CLI",
        "",
        "```",
        "python benchmarks/adapter_example.py --work ./example   # keeps the checkpoints in ./example",
        "lora-plan adapter analyze ./example/lora-r8 --model gpt2 --seq-len 128",
        "lora-plan adapter resize ./example/lora-r8 --energy 0.9 -o ./example/lora-r8-small",
        "lora-plan adapter diff ./example/base.safetensors ./example/full.safetensors --include c_attn",
        "lora-plan report adapter ./example/lora-r8 ./example/lora-r1 -o adapters.md",
        "```",
        "",
        adapter_section("LoRA r=8", r8, level=2),
        adapter_section("LoRA r=1", r1, level=2),
        adapter_section("Full update, attn.c_attn", diff_attn, level=2),
    ]
    path.write_text("\n".join(text).rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
