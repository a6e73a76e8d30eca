"""Helpers shared by the command modules: option parsing, errors, the warm-up options."""

from __future__ import annotations

import sys

import click

from ..errors import InfluenceError

DEMO_POOL = ("flan_cot_sample.tsv", "p3_sample.jsonl")


def demo_pool_files() -> list[str]:
    """The embedded demo pool: small samples of FLAN-CoT and P3 (Apache-2.0), vendored in the package."""
    from importlib import resources

    folder = resources.files("influence.resources").joinpath("demo")
    return [str(folder.joinpath(name)) for name in DEMO_POOL]


def split_list(value: str | None) -> list[str] | None:
    """A comma-separated option as a list (None when not given)."""
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


def positive_int(value: str, option: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise InfluenceError(f"{option} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise InfluenceError(f"{option} must be a positive integer, got {number}")
    return number


def fail(err: Exception) -> None:
    click.secho(f"error: {err}", fg="red", err=True)
    sys.exit(2)


def warmup_options(command):
    """The warm-up settings, shared by `warmup` and `evaluate noisy`."""
    options = [
        click.option("--model", default="smollm2-135m", show_default=True,
                     help="Hugging Face id, local folder, 'smollm2-135m' (embedded) or 'tiny-llama' (tests)."),
        click.option("--train", "train_files", multiple=True, type=click.Path(dir_okay=False),
                     help="Pool file (.jsonl/.json/.tsv); repeat for several. Default: the embedded demo pool."),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory to create."),
        click.option("--fraction", default=0.05, show_default=True, help="Random fraction of the pool to warm up on."),
        click.option("--epochs", default=4, show_default=True, help="Epochs; one checkpoint is kept per epoch."),
        click.option("--lr", "learning_rate", default=2e-5, show_default=True, help="Peak learning rate (linear decay)."),
        click.option("--warmup-ratio", default=0.03, show_default=True, help="Fraction of steps with linear LR warm-up."),
        click.option("--batch-size", default=1, show_default=True, help="Examples per forward pass."),
        click.option("--grad-accum", default=32, show_default=True, help="Forward passes per optimizer step."),
        click.option("--max-length", default=2048, show_default=True, help="Truncate examples to this many tokens."),
        click.option("--lora-r", default=128, show_default=True),
        click.option("--lora-alpha", default=512.0, show_default=True),
        click.option("--lora-dropout", default=0.1, show_default=True),
        click.option("--lora-modules", default="q_proj,k_proj,v_proj,o_proj", show_default=True,
                     help="Comma-separated module names to adapt."),
        click.option("--seed", default=0, show_default=True, help="Seed of the subset, LoRA init and data order."),
        click.option("--max-grad-norm", default=1.0, show_default=True,
                     help="Clip the gradient norm of each optimizer step (the Trainer default LESS trains with); 0 = off."),
        click.option("--loss-weighting", default="micro_batch", show_default=True,
                     type=click.Choice(["micro_batch", "token"]),
                     help="Under accumulation: each forward pass's mean loss / accumulation steps (Trainer 4.36, "
                          "LESS) or every response token of the step weighted alike (Trainer >= 4.46)."),
        click.option("--bf16", is_flag=True, help="bfloat16 autocast for the forward pass."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def warmup_config(model, train_files, out, fraction, epochs, learning_rate, warmup_ratio, batch_size, grad_accum,
                   max_length, lora_r, lora_alpha, lora_dropout, lora_modules, seed, max_grad_norm, loss_weighting, bf16,
                   track_all=False):
    from ..models import LoraSettings
    from ..train.warmup import WarmupConfig

    return WarmupConfig(
        model=model,
        train_files=list(train_files) or demo_pool_files(),
        out=out,
        lora=LoraSettings(lora_r, lora_alpha, lora_dropout, [m.strip() for m in lora_modules.split(",") if m.strip()]),
        fraction=fraction, epochs=epochs, learning_rate=learning_rate, warmup_ratio=warmup_ratio,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, seed=seed, max_grad_norm=max_grad_norm,
        loss_weighting=loss_weighting, bf16=bf16, track_all=track_all,
    )
