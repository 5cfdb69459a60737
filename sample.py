"""sample.py: turn a checkpoint into text, and show that the causal mask keeps the future out.

    python sample.py                                    # the newest run under outputs/, streamed
    python sample.py ckpt=outputs/2026-01-01/12-00-00 prompt="ROMEO:" num_samples=3 temperature=0.8
    echo "To be" | python sample.py prompt=- temperature=0    # greedy, prompt from standard input
    python sample.py mode=leakage model=tiny            # the leakage check on a random-init preset
    python sample.py mode=leakage ckpt=<run dir>        # ... on a trained model (exit 1 if it leaks)
    python sample.py mode=attention prompt="To be, or not to be"   # attention heatmaps per head

Options: SampleConfig below (configs/sample.yaml sets the defaults). Free text needs no Hydra quoting
(`prompt=Où est-il ?`, `prompt='He said "hi"'`: cli.quote_free_text); prompt_file= reads a file.
Generated text goes to stdout, everything else (progress, warnings, tokens/s) to stderr, so
`python sample.py > out.txt` keeps just the text. Exit status: 0 done; 2 a user error (one line,
`error: ...`, cli.main_guard); mode=leakage 1 LEAK, 3 INCONCLUSIVE, 4 FAIL (causality/leakage.py);
mode=attention 1 when a causal model gives weight to a later token.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import cli
from causality.leakage import LeakageConfig, run_leakage_check
from causality.sampling import (
    Loaded,
    encode_prompt,
    inference_runtime,
    label,
    load_from_checkpoint,
    random_init,
    read_prompt,
    stream_sample,
    study_prompt,
    vocab_limit,
)
from engine.config import LoggerConfig
from engine.runtime import Runtime
from model import ModelConfig
from model.generate import check_sampling_args, compile_for_generation

log = logging.getLogger("sample")
MODES = ("generate", "leakage", "attention")


@dataclass
class SampleConfig:
    # generate: text from a checkpoint; leakage: the causal-mask check; attention: heatmaps per head.
    mode: str = "generate"
    # A checkpoint file or run directory (best.pt, else last.pt); null = the newest run under outputs_dir.
    ckpt: str | None = None
    # Where training runs are looked for when ckpt is null.
    outputs_dir: str = "outputs"
    # A preset to study untrained instead of ckpt (model=tiny), for mode=leakage|attention; vocab_size 65 unless set.
    model: ModelConfig | None = None
    # The prompt; "-" reads standard input; "" starts from the end-of-text (or newline) token.
    prompt: str = ""
    # A UTF-8 file to read the prompt from (instead of prompt).
    prompt_file: str | None = None
    # Continuations to generate, one after the other, and tokens per continuation.
    num_samples: int = 1
    max_new_tokens: int = 200
    # Softmax temperature; 0 is greedy (the most likely token every time).
    temperature: float = 0.8
    # Keep only the k most likely tokens (null: all; above the vocabulary size: a warning).
    top_k: int | None = None
    # Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (null: off).
    top_p: float | None = None
    # End a sample at the end-of-text token, unprinted (tokenizers that have one); false runs to max_new_tokens.
    stop_at_eot: bool = True
    # Seeds sampling (and random-init weights): the same seed gives the same text.
    seed: int = 1337
    # auto | cpu | cuda | mps, and auto | fp32 | bf16 | fp16 (autocast), as in train.py.
    device: str = "auto"
    precision: str = "auto"
    # CPU threads for torch; 0 = all cores. On a busy machine 1 is often faster: batch-1 matmuls are too small to split.
    threads: int = 0
    # torch.compile the prefill/decode step (pays off on GPU for long generations).
    compile: bool = False
    # Reuse keys and values of past positions (KV cache); false recomputes the whole sequence per token.
    use_cache: bool = True
    # mode=leakage|attention: prompt length when no prompt is given (sampled from the model, cut to the context).
    seq_len: int = 64
    # Where leakage/attention write their files; null = <run dir>/<mode>/<time>, or outputs_dir/<mode>/<time>.
    out_dir: str | None = None
    # mode=leakage: the check's settings, documented in causality/leakage.py (LeakageConfig).
    leakage: LeakageConfig = field(default_factory=LeakageConfig)
    # logger=wandb logs the heatmaps as W&B images (offline unless logged in); logger=none (default) does not.
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(name="none"))

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not valid; choose one of {list(MODES)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = all cores), got {self.threads}")
        for name in ("num_samples", "max_new_tokens", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ckpt and self.model is not None:
            raise ValueError("give ckpt=... (a trained model) or model=<preset> (random init), not both")
        check_sampling_args(self.temperature, self.top_k, self.top_p)


def register_configs() -> None:
    """The schemas of the config groups (cli) and of this root config, in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore
    cli.register_configs()
    ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


# ---- the three modes ---------------------------------------------------------------------------
def generate(cfg: SampleConfig, loaded: Loaded, rt: Runtime, text: str, stdout: TextIO, stderr: TextIO) -> int:
    tok, model = loaded.tokenizer, loaded.model
    if tok is None:
        raise ValueError(f"checkpoint {loaded.source} holds no tokenizer, so its ids cannot be turned into text")
    if cfg.top_k is not None and cfg.top_k > model.config.vocab_size:
        log.warning("top_k=%d is larger than the vocabulary (%d tokens): every token is kept", cfg.top_k,
                    model.config.vocab_size)
    ids = encode_prompt(tok, text, model.config.block_size)
    shown = tok.decode(ids) if text else ""  # the (possibly cropped) prompt; not the start token
    limit = vocab_limit(tok, model)  # ids past the tokenizer are never drawn
    if cfg.compile:
        compile_for_generation(model)
        # One greedy generation of the same length compiles every shape the timed ones will meet
        # (prefill, decode at each cache length, the re-prefill past block_size), so tokens/s
        # measures the compiled code; greedy draws nothing from the sampling generator.
        log.info("compiling: one warm-up generation of %d tokens (kept out of tokens/s)", cfg.max_new_tokens)
        with rt.autocast():
            model.generate(torch.tensor([ids], device=rt.device), cfg.max_new_tokens, temperature=0.0,
                           use_cache=cfg.use_cache, vocab_limit=limit)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)

    def write(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()  # show each piece as soon as its token exists

    tokens, seconds = 0, 0.0
    for i in range(cfg.num_samples):
        write(("\n---------------\n" if i else "") + shown)
        with rt.autocast():
            sample = stream_sample(model, tok, ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                   top_k=cfg.top_k, top_p=cfg.top_p, use_cache=cfg.use_cache, generator=generator,
                                   write=write, vocab_limit=limit, stop_id=tok.eot_id if cfg.stop_at_eot else None)
        tokens, seconds = tokens + len(sample.new_ids), seconds + sample.seconds
    write("\n")
    print(f"{tokens} tokens in {seconds:.2f} s: {tokens / max(seconds, 1e-9):.1f} tokens/s "
          f"(KV cache {'on' if cfg.use_cache else 'off'}, {rt.device.type}, {rt.precision}"
          f"{', compiled' if cfg.compile else ''})", file=stderr)
    return 0


def leakage(cfg: SampleConfig, loaded: Loaded, rt: Runtime, idx: torch.Tensor, out: Path, stdout: TextIO) -> int:
    from causality.report import format_report, plot_influence, summary  # matplotlib: only here
    report = run_leakage_check(loaded.model, idx, cfg.leakage, rt.autocast(), seed=cfg.seed)
    n = report.masked.influence.shape[0]
    png = plot_influence(report.masked.influence, report.unmasked.influence, out / "influence.png",
                         [label(loaded.tokenizer, i) for i in idx[0, :n].tolist()])
    write_json(out / "leakage.json", summary(report, source=loaded.source, device=rt.device.type,
                                             precision=rt.precision, prompt_ids=idx[0].tolist(),
                                             files={"influence": str(png)}))
    header = (f"Causal-mask leakage check: {loaded.source}, {rt.device.type}, {rt.precision}, "
              f"prompt of {idx.shape[1]} tokens")
    stdout.write(format_report(report, header, rt.dtype) + "\n")
    stdout.write(f"files: {png} (heatmaps), {out / 'leakage.json'} (every number)\n")
    log_images(cfg, out, {"influence": png}, {"verdict": report.verdict,
                                              "max_past_change_mask_on": report.masked.max_past_change})
    return report.exit_code


def attention(cfg: SampleConfig, loaded: Loaded, rt: Runtime, idx: torch.Tensor, out: Path, stdout: TextIO) -> int:
    from causality.report import write_attention_maps  # matplotlib, as above
    maps = write_attention_maps(loaded.model, idx, out, [label(loaded.tokenizer, i) for i in idx[0].tolist()],
                                rt.autocast())
    write_json(out / "attention.json", {"source": loaded.source, "prompt_ids": idx[0].tolist(), **maps.summary()})
    n_layer, n_head = maps.weights.shape[:2]
    stdout.write(f"attention weights of {loaded.source} for a {idx.shape[1]}-token prompt: {n_layer} layers x "
                 f"{n_head} heads\n{maps.path_line()}\n{maps.zero_line()}\n"
                 f"files: {maps.grid_file} (all heads), {out}/layer<L>_head<H>.png, {out / 'attention.json'}\n")
    images = {f"attention/{name}": p for name, p in {"grid": maps.grid_file, **maps.head_files}.items()}
    log_images(cfg, out, images, {"max_weight_above_diagonal": maps.max_above_diagonal})
    return 1 if maps.broken_mask else 0


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Strict JSON: NaN and infinities (a broken model's numbers) become the strings "nan", "inf", "-inf"."""
    strict = json.loads(json.dumps(data), parse_constant=lambda c: str(float(c)))
    path.write_text(json.dumps(strict, indent=1, allow_nan=False))


def log_images(cfg: SampleConfig, out: Path, images: dict[str, Path], values: dict[str, Any]) -> None:
    """Log the PNGs to W&B (logger=wandb): online when logged in, offline otherwise (files in out/wandb)."""
    from engine.metrics import wandb_init_args, wandb_mode  # the trainer's rules: mode, name, project
    mode = wandb_mode(cfg.logger)
    if mode == "disabled":
        return
    import wandb
    run = wandb.init(**wandb_init_args(cfg.logger, out), mode=mode, dir=str(out), job_type=cfg.mode,
                     config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    run.log({name: wandb.Image(str(path)) for name, path in images.items()})
    run.summary.update(values)
    run.finish()
    log.info("logged %d image(s) to W&B (%s)", len(images), mode)


# ---- entry point -------------------------------------------------------------------------------
def run(cfg: SampleConfig, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
        stderr: TextIO = sys.stderr) -> int:
    """Run one mode; returns the exit status (see the top of this file)."""
    rt = inference_runtime(cfg.device, cfg.precision, cfg.compile)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.model is not None and cfg.mode == "generate":
        raise ValueError(f"model={cfg.model.preset or 'custom'} builds an untrained model: use it with "
                         "mode=leakage or mode=attention; for text give ckpt=... (train one: python train.py)")
    loaded = (random_init(cfg.model, cfg.seed, rt.device) if cfg.model is not None
              else load_from_checkpoint(cfg.ckpt, cfg.outputs_dir, rt.device))
    text = read_prompt(cfg.prompt, cfg.prompt_file, stdin)
    if cfg.mode == "generate":
        return generate(cfg, loaded, rt, text, stdout, stderr)
    idx = study_prompt(loaded, text, cfg.seq_len, cfg.seed)  # (1, T)
    base = loaded.run_dir if loaded.run_dir is not None else Path(cfg.outputs_dir)
    out = Path(cfg.out_dir) if cfg.out_dir else base / cfg.mode / time.strftime("%Y-%m-%d_%H-%M-%S")
    return (leakage if cfg.mode == "leakage" else attention)(cfg, loaded, rt, idx, out, stdout)  # mode: checked


class _ConsoleFormatter(logging.Formatter):
    """Progress as bare lines; warnings and errors prefixed, one line each."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


@hydra.main(config_path=cli.CONFIG_DIR, config_name="sample", version_base="1.3")
@cli.main_guard
def main(dcfg: DictConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for noisy in ("matplotlib", "PIL"):  # their debug/info chatter is not ours to show
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from hydra.core.hydra_config import HydraConfig
    cli.check_added_keys(HydraConfig.get().overrides.task, SampleConfig, cli.CONFIG_DIR)  # +prompts=...: refused
    cfg: SampleConfig = OmegaConf.to_object(dcfg)  # the one conversion: validated dataclasses from here on
    try:
        code = run(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `python sample.py | head`: the reader left, nothing more to say
        sys.stderr.close()
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    register_configs()
    sys.argv = cli.quote_free_text(sys.argv, cli.SAMPLE_TEXT)  # prompts, paths, names exactly as typed
    cli.run_and_exit(main)
