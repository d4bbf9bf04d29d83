"""Training speed: a plain Hugging Face Trainer + PEFT run against `banklora train`, back to back.

    .venv/bin/python bench/train_speed.py                 # 8 steps of batch 4 each, both runs
    .venv/bin/python bench/train_speed.py --steps 16 --data banking

Both runs get the same examples (the first steps x batch of the train split, tokenized by
banklora's formatter, so the ids, labels and lengths are identical), the same LoRA config (the
seed's r=8, alpha=32, dropout 0.1 on q/k/v/o/gate/up/down), the same AdamW, peak lr, warmup and
schedule (banklora's: warmup capped at 10% of the run, cosine decay to 10% of the peak; handed
to the Trainer as a LambdaLR, so neither run warms up or decays differently) and number of
steps, each in its own fresh process so peak memory (RSS, including loading) is its own. The
reference is the way most tutorials and LLaMA-Factory do it: `Trainer` with
`DataCollatorForSeq2Seq` padding labels with -100 and the model's own loss over full logits.
The reference runs three times: in fp32 and with `bf16=True` (transformers' CPU mixed precision),
both as tutorials run them, and with `bf16=True` under THP_MEM_ALLOC_ENABLE=1, the torch setting
banklora turns on for itself; banklora three times: its defaults (bf16 autocast on CPUs with
AVX512-BF16 or AMX), --dtype fp32 and --low-memory. banklora is compared with the fastest reference.
Printed: tokens/s of the training steps (model loading excluded), peak RSS, the loss both
compute on the same first batch before any update, and the ratios. Run it on an idle machine;
the ratio is what to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _examples(data: str, n: int):
    from banklora.data.dataset import load_examples
    from banklora.data.prepare import prepare
    from banklora.modeling import load_tokenizer

    examples = load_examples([data], split="train")
    prepared = prepare(examples, load_tokenizer(None), 512)
    return prepared.examples[:n], prepared.encoded[:n]


def _first_batch_loss_reference(model, encoded, batch_size, pad_id):
    import torch

    from banklora.data.batching import collate

    batch = collate(encoded[:batch_size], pad_id)
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()  # the model's own loss: full logits, mean over labels != -100
    model.train()
    return loss


def reference(args, bf16: bool = False) -> dict:
    """Trainer + PEFT, as tutorials write it; bf16=True: with `TrainingArguments(bf16=True,
    use_cpu=True)`, the CPU mixed-precision recipe transformers documents (autocast over fp32 weights)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from banklora.basemodel import embedded_checkpoint
    from banklora.config import TrainSettings
    from banklora.modeling import load_tokenizer
    from banklora.train import lr_factor

    _, encoded = _examples(args.data, args.steps * args.batch_size)
    tokenizer = load_tokenizer(None)
    model = AutoModelForCausalLM.from_pretrained(embedded_checkpoint(), dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    first = _first_batch_loss_reference(model, encoded, args.batch_size, tokenizer.pad_token_id)
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e), "labels": e.labels} for e in encoded]

    class Clock(TrainerCallback):
        def __init__(self):
            self.seconds, self.tokens, self.losses, self._t = 0.0, 0, [], 0.0

        def on_step_begin(self, *a, **k):
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.seconds += time.perf_counter() - self._t

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    class InOrder(Trainer):  # the same batches as listed, so both runs see the same padding
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    clock = Clock()
    out = tempfile.mkdtemp(prefix="bench-ref-")
    seed = TrainSettings()  # banklora's lr, weight decay and warmup rule, so both runs follow one schedule
    warmup = seed.warmup_for(args.steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=seed.lr, weight_decay=seed.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, args.steps))
    trainer = InOrder(
        model=model,
        args=TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=seed.lr,
                               max_grad_norm=seed.max_grad_norm, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                               dataloader_num_workers=0, seed=42, disable_tqdm=True, bf16=bf16),
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[clock],
        optimizers=(optimizer, schedule),
    )
    trainer.train()
    tokens = sum(len(e) for e in encoded)
    return {"tokens_per_second": tokens / clock.seconds, "seconds": clock.seconds, "tokens": tokens, "first_batch_loss": first,
            "losses": clock.losses, "peak_rss_mib": _peak_rss_mib()}


def banklora_first(args) -> dict:
    """The loss banklora's training computes on the reference's first batch, before any update
    (its own process, so the training run's peak memory is not inflated by a second model)."""
    import torch

    from banklora import kernels
    from banklora.config import LoraSettings
    from banklora.data.batching import collate
    from banklora.loss import answer_loss
    from banklora.modeling import add_lora, load

    _, encoded = _examples(args.data, args.batch_size)
    loaded = load(None, training=True)
    model = add_lora(loaded.model, LoraSettings(), tokenizer=loaded.tokenizer).eval()
    kernels.install(model)
    with torch.no_grad():
        return {"first_batch_loss": answer_loss(model, collate(encoded, loaded.tokenizer.pad_token_id)).item()}


def banklora_run(args, low_memory: bool = False, dtype: str = "auto") -> dict:
    from banklora.config import TrainSettings
    from banklora.data.dataset import write_jsonl
    from banklora.train import train

    examples, encoded = _examples(args.data, args.steps * args.batch_size)
    work = Path(tempfile.mkdtemp(prefix="bench-banklora-"))
    write_jsonl(examples, work / "data.jsonl")
    settings = TrainSettings(data=(str(work / "data.jsonl"),), output_dir=str(work / "adapter"), max_steps=args.steps,
                             batch_size=args.batch_size, save_every=0, low_memory=low_memory, dtype=dtype, turn_end_budget=0)
    result = train(settings, show_progress=False)
    tokens = sum(len(e) for e in encoded)
    fit_seconds = tokens / result.meta["train_tokens_per_second"]
    return {"tokens_per_second": result.meta["train_tokens_per_second"], "seconds": fit_seconds, "tokens": tokens,
            "losses": result.losses, "peak_rss_mib": _peak_rss_mib(), "precision": result.meta["dtype"]}


WORKERS = {"reference": reference, "reference_bf16": lambda args: reference(args, bf16=True),
           "reference_bf16_thp": lambda args: reference(args, bf16=True), "banklora": banklora_run,
           "banklora_fp32": lambda args: banklora_run(args, dtype="fp32"), "banklora_low_memory": lambda args: banklora_run(args, low_memory=True),
           "banklora_first": banklora_first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--data", default="banking")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        result = WORKERS[args.worker](args)
        print("RESULT " + json.dumps(result))
        return

    results = {}
    for worker in WORKERS:
        cmd = [sys.executable, __file__, "--worker", worker, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--data", args.data]
        # banklora turns on torch's huge-page allocation (banklora/__init__.py); the references run without it, as
        # tutorials do, and once with it, so that banklora is compared with the reference at its best
        thp = "0" if worker in ("reference", "reference_bf16") else "1"
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, BANKLORA_LOG_LEVEL="WARNING", THP_MEM_ALLOC_ENABLE=thp))
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            sys.exit(f"{worker} run failed:\n{done.stderr[-4000:]}")
        results[worker] = json.loads(line[len("RESULT "):])
    first = results["banklora_first"]
    ours, fp32 = results["banklora"] | first, results["banklora_fp32"] | first
    low = results["banklora_low_memory"] | first
    # the fastest of the three references is the one to beat
    references = {"fp32": results["reference"], "bf16": results["reference_bf16"], "bf16 + huge pages": results["reference_bf16_thp"]}
    ref_name, ref = max(references.items(), key=lambda item: item[1]["tokens_per_second"])
    print(f"{args.steps} steps x batch {args.batch_size} on {ref['tokens']} tokens of {args.data} (train split), 270M, {os.cpu_count()} cores; "
          f"banklora's default here: {ours['precision']}")
    print(f"{'':34}{'tokens/s':>10}{'peak RSS MiB':>14}{'first-batch loss':>18}{'last loss':>11}")
    for name, r in (("HF Trainer + PEFT, fp32", results["reference"]), ("HF Trainer + PEFT, bf16=True", results["reference_bf16"]),
                    ("HF Trainer + PEFT, bf16, THP on", results["reference_bf16_thp"]),
                    ("banklora train (default)", ours), ("banklora train --dtype fp32", fp32), ("banklora train --low-memory", low)):
        loss0 = f"{r['first_batch_loss']:>18.6f}" if "first_batch_loss" in r else f"{'':>18}"
        print(f"{name:34}{r['tokens_per_second']:>10.1f}{r['peak_rss_mib']:>14.0f}{loss0}{r['losses'][-1]:>11.4f}")
    print(f"speed ratio (banklora / the fastest reference, {ref_name}): "
          f"{ours['tokens_per_second'] / ref['tokens_per_second']:.2f}x; --dtype fp32 / HF fp32: "
          f"{fp32['tokens_per_second'] / results['reference']['tokens_per_second']:.2f}x; "
          f"peak memory ratio: {ours['peak_rss_mib'] / ref['peak_rss_mib']:.2f}; "
          f"first-batch loss difference (fp32): {abs(ours['first_batch_loss'] - results['reference']['first_batch_loss']):.2e}")
    print(f"--low-memory: speed ratio {low['tokens_per_second'] / ref['tokens_per_second']:.2f}x; "
          f"peak memory ratio: {low['peak_rss_mib'] / ref['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
