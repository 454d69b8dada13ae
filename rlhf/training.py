"""Pieces shared by the training stages: LR schedule, masked LM loss, checkpoints that survive SIGKILL.

A checkpoint holds everything needed to continue bit-for-bit on the same machine: model and optimizer
state, the step, the data order position and every RNG state. It is written to a temporary sibling and
moved into place (`os.replace`), so a kill during the write leaves the previous checkpoint intact. It
carries a fingerprint of the params and inputs; a checkpoint from other params is ignored, not resumed.
It also carries the dvclive curves up to its step, so a resumed run's plots equal an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from rlhf.errors import StageError
from rlhf.io import atomic_path

IGNORE_INDEX = -100


def cosine_lr(step: int, total: int, *, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up then cosine decay to `min_ratio * lr` (nanoGPT; min lr ~ lr/10 per Chinchilla)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not IGNORE_INDEX.

    logits (B, T, V) predict labels shifted by one: logits[:, t] scores labels[:, t + 1].
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def check_finite(value: torch.Tensor | float, what: str, step: int, checkpoint_dir: Path | None) -> None:
    """Numerical faults stop the stage with a clear error; the last good checkpoint stays on disk."""
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        kept = f"; the last good checkpoint is kept in {checkpoint_dir}" if checkpoint_dir else ""
        raise StageError(f"{what} became {v} at step {step}: lower the learning rate or check the data{kept}")


def fingerprint(*parts: Any) -> str:
    """Stable hash of params and input identities: a checkpoint only resumes the run that wrote it."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(p.relative_to(path).as_posix().encode())
                h.update(p.read_bytes())
    elif path.exists():
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (what a checkpoint of it needs on disk, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class Checkpointer:
    """Periodic atomic checkpoints in `directory`, tagged with a fingerprint of the run."""

    def __init__(self, directory: str | Path | None, tag: str):
        self.directory = Path(directory) if directory else None
        self.tag = tag

    @property
    def path(self) -> Path | None:
        return self.directory / "checkpoint.pt" if self.directory else None

    def save(self, state: dict[str, Any]) -> None:
        """Write atomically; a write that fails (a full disk) leaves the previous checkpoint in place.

        torch.save gets an open file, not a path: a failed write then raises OSError with its errno
        (ENOSPC) instead of the zip writer's "unexpected pos" RuntimeError.
        """
        if self.path is None:
            return
        with atomic_path(self.path, need=tensor_bytes(state)) as tmp, tmp.open("wb") as fh:
            torch.save({"tag": self.tag, **state}, fh)

    def load(self) -> dict[str, Any] | None:
        """The saved state of this same run, or None (no checkpoint, or one from other params)."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            # weights_only: tensors and plain containers only, nothing arbitrary is unpickled.
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: start over rather than crash
            from rlhf.progress import console

            console.print(f"[yellow]ignoring unreadable checkpoint {self.path}: {exc}")
            return None
        if state.get("tag") != self.tag:
            from rlhf.progress import console

            console.print(f"[yellow]ignoring checkpoint {self.path}: written with other params or inputs")
            return None
        return state

    def clear(self) -> None:
        if self.directory and self.directory.exists():
            shutil.rmtree(self.directory)

    # A training loop's checkpoint: model, optimizer and `rest` (step, RNG, curves). Unsharded, rank 0 writes
    # them all to checkpoint.pt. Sharded (FSDP), each rank writes its shards of model and optimizer under
    # `sharded-<step>/` (torch.distributed.checkpoint), then rank 0 writes checkpoint.pt with the rest and the
    # folder's name: a kill at any point leaves checkpoint.pt naming a complete folder.

    def save_training(self, model, optimizer, rest: dict[str, Any], dist) -> None:
        """Called by every rank at the same step."""
        if dist.fsdp and dist.enabled:
            self.save_sharded({"model": (model, optimizer)}, rest, dist)
        elif dist.is_main:
            self.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **rest})

    def restore(self, model, optimizer, dist) -> dict[str, Any] | None:
        """Load this run's checkpoint into model and optimizer, if there is one; returns its state (for the
        step, RNG and curves) or None. One written by a sharded run is not read by an unsharded one, or back."""
        state = self.load()
        sharded = dist.fsdp and dist.enabled
        if state is not None and ("shards" in state) != sharded:
            if dist.is_main:
                from rlhf.progress import console

                console.print(f"[yellow]ignoring checkpoint {self.path}: written by a "
                              f"{'sharded' if 'shards' in state else 'unsharded'} run; starting over", soft_wrap=True)
            return None
        if state is not None:
            if sharded:
                self.load_sharded({"model": (model, optimizer)}, state)
            else:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
        return state

    def save_sharded(self, pairs: dict[str, tuple[Any, Any]], state: dict[str, Any], dist) -> None:
        """Every rank calls it (a collective): the shards of each named (model, optimizer) pair first, then
        checkpoint.pt with `state`, then older shards go."""
        if self.directory is None:
            return
        import torch.distributed.checkpoint as dcp

        name = f"sharded-{state['step']}"
        dcp.save(sharded_states(pairs), checkpoint_id=self.directory / name)
        dist.barrier()
        if dist.is_main:
            self.save({**state, "shards": name})
            for old in self.directory.glob("sharded-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load_sharded(self, pairs: dict[str, tuple[Any, Any]], state: dict[str, Any]) -> None:
        """The shards named by `state` (what `load` returned) into each sharded model and its optimizer."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        shards = sharded_states(pairs)
        dcp.load(shards, checkpoint_id=self.directory / state["shards"])
        for key, (model, optimizer) in pairs.items():
            set_state_dict(model, optimizer, model_state_dict=shards[key]["model"],
                           optim_state_dict=shards[key]["optimizer"])


def sharded_states(pairs: dict[str, tuple[Any, Any]]) -> dict[str, dict[str, Any]]:
    """{name: {"model": ..., "optimizer": ...}}: each sharded pair's state dicts, as torch.distributed.checkpoint
    saves and loads them (each rank its own shards)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return {key: dict(zip(("model", "optimizer"), get_state_dict(model, optimizer), strict=True))
            for key, (model, optimizer) in pairs.items()}


def quiet_live_class():
    """dvclive's `Live` without its repository setup, which the stages never use (their curves are outputs
    declared in dvc.yaml; no experiment is saved, no dvc.yaml written).

    That setup (`Live._init_dvc`) runs `dvc init` in any git repository that is no DVC project, and in a
    repository with no commits yet dies with a traceback (`scmrepo.exceptions.SCMError: Empty git repo`,
    dvclive 3.48). What the stages need of it is kept: the name of the dvc.yaml file and whether `dvc repro`
    or `dvc exp run` runs the stage (DVC_ROOT set).
    """
    from dvclive import Live  # bench/gpu_check.py may stand in a dvclive of its own: only `Live` is imported

    class QuietLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_file = self._init_dvc_file()
            if os.getenv("DVC_ROOT"):  # dvclive.env.DVC_ROOT: set by `dvc repro` / `dvc exp run`
                self._inside_dvc_pipeline = True
                self._init_dvc_pipeline()

    return QuietLive


def open_live(directory: str | Path, resume: bool = False):
    """dvclive logger for a stage's curves (plots declared in dvc.yaml, no DVC side effects)."""
    Live = quiet_live_class()

    directory = Path(directory)
    if not resume and directory.exists():
        shutil.rmtree(directory)
    summary = directory / "metrics.json"
    if resume and summary.exists():
        # A SIGKILL can land while dvclive rewrites its summary, leaving it empty; dvclive would fail to
        # read it. The curves come back from the checkpoint's snapshot (restore_live), so drop a broken one.
        try:
            json.loads(summary.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            summary.unlink()
    try:
        live = Live(str(directory), dvcyaml=None, save_dvc_exp=False, report=None, resume=resume)
    except OSError as exc:
        raise _live_write_failure(exc, directory) from exc
    # dvclive writes its curves in place, not atomically: a failed write (a full disk) names the folder,
    # and the CLI removes the partial folder (the curves come back from the checkpoint on resume).
    for name in ("log_metric", "next_step", "make_summary", "end"):
        setattr(live, name, _naming_failures(getattr(live, name), directory))
    return live


def _live_write_failure(exc: OSError, directory: Path):
    from rlhf.io import write_failure

    return write_failure(exc, exc.filename or directory)


def _naming_failures(method, directory: Path):
    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except OSError as exc:
            raise _live_write_failure(exc, directory) from exc

    return call


def live_snapshot(live) -> dict[str, str]:
    """The dvclive folder's text files (curves and summary), saved inside each checkpoint.

    DVC deletes a stage's plots before rerunning it and a killed run logs past its last checkpoint,
    so the curves are restored from the checkpoint on resume instead of trusting what is on disk.
    """
    if live is None:
        return {}
    root = Path(live.dir)
    return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".tsv", ".json")}


def restore_live(live, files: dict[str, str] | None, step: int) -> None:
    """Put the curves back as they were at the checkpoint, so a resumed run's plots equal an uninterrupted run's."""
    if live is None or files is None:
        return
    from rlhf.io import atomic_write_text

    root = Path(live.dir)
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".tsv", ".json") and p.relative_to(root).as_posix() not in files:
            p.unlink()  # a curve the killed run started after its last checkpoint
    for rel, text in files.items():
        atomic_write_text(root / rel, text)
    live.summary = json.loads(files.get("metrics.json", "{}"))
    live.step = step


def epoch_batches(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the batch at global `step`: epochs are fresh permutations seeded by (seed, epoch).

    Deriving the batch from the step alone makes the data position part of the step counter, so a
    resumed run sees exactly the batches the uninterrupted run would have seen.
    """
    per_epoch = max(1, n_items // batch_size)
    epoch, offset = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n_items, generator=gen)
    return perm[offset * batch_size: (offset + 1) * batch_size].tolist()


def train_loop(
    *,
    model,
    optimizer,
    loss_fn,
    total_steps: int,
    lr_at,
    checkpointer: Checkpointer,
    checkpoint_every: int,
    live,
    description: str,
    evaluate=None,
    eval_every: int = 0,
    dist=None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """The shared loop of pretrain and sft: step, clip, log, evaluate, checkpoint, resume.

    `loss_fn(step) -> loss tensor` builds this rank's share of the batch of `step` and runs the model;
    under several processes the gradients are averaged across ranks after backward. `evaluate() -> dict` returns scalar
    metrics logged next to the training loss. Only rank 0 logs and checkpoints. Returns the last values, and
    `resumed_from`: the step this invocation started at (0 unless it resumed from a checkpoint).
    """
    from rlhf.dist import Dist
    from rlhf.progress import progress

    dist = dist or Dist()
    start = 0
    state = checkpointer.restore(model, optimizer, dist)
    if state is not None:
        set_rng_state(state["rng"])
        start = state["step"]
        if dist.is_main:
            from rlhf.progress import console

            console.print(f"{description}: resuming from {checkpointer.path} at step {start} of {total_steps}", soft_wrap=True)
            restore_live(live, state.get("live"), start)
    last: dict[str, Any] = {"resumed_from": start}  # the step this invocation started at (a timing, not a metric)
    model.train()
    with progress() as bar:
        task = bar.add_task(description, total=total_steps, completed=start, info="", visible=dist.is_main)
        for step in range(start, total_steps):
            set_lr(optimizer, lr_at(step))
            loss = loss_fn(step)
            # The mean over ranks: a NaN on any rank stops every rank (none is left waiting in a collective).
            loss_value = dist.mean(float(loss.detach()))
            check_finite(loss_value, f"{description} loss", step, checkpointer.directory)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(model)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if hasattr(grad_norm, "full_tensor"):  # sharded parameters: a DTensor, the same norm on every rank
                grad_norm = grad_norm.full_tensor()
            # A finite loss can still give inf/NaN gradients; stop before they reach the weights.
            check_finite(grad_norm, f"{description} gradient norm", step, checkpointer.directory)
            optimizer.step()
            last["train_loss"] = loss_value
            if evaluate is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == total_steps):
                model.eval()
                for k, v in evaluate().items():
                    last[k] = v
                    if dist.is_main:
                        live.log_metric(f"eval/{k}", round(v, 6))
                model.train()
            if dist.is_main:
                live.log_metric("train/loss", round(last["train_loss"], 6))
                live.log_metric("train/lr", lr_at(step))
                live.next_step()
            bar.update(task, advance=1, info=f"loss {last['train_loss']:.3f}")
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < total_steps:
                checkpointer.save_training(model, optimizer, {"rng": rng_state(), "step": step + 1,
                                                              "live": live_snapshot(live)}, dist)
    model.eval()
    return last


# ----------------------------------------------------------------------------------------------
# Supervised examples: a chat prompt and its response, the loss on the response only (sft, dpo)


def build_example(tokenizer, prompt: str, response: str, max_len: int | None) -> tuple[list[int], list[int]] | None:
    """Token ids and labels; prompt positions are IGNORE_INDEX so only the response (and its EOS) is learned.

    Longer than `max_len` (the stage's max_len, or the model's position limit when lower): the prompt is
    cut on the left, keeping its first token and the end of the conversation, so the whole response is
    still learned; None when even the response leaves no room for a prompt token (the record is dropped).
    Both are counted in the stage's length tally (rlhf.lengths.fit_example).
    """
    from rlhf.lengths import fit_example, note_lengths
    from rlhf.tokenization import encode_prompt, encode_response

    fitted = fit_example(encode_prompt(tokenizer, prompt), encode_response(tokenizer, response, add_eos=True), max_len)
    if fitted is None:
        note_lengths(max_len, dropped=1)
        return None
    p_ids, r_ids = fitted
    return p_ids + r_ids, [IGNORE_INDEX] * len(p_ids) + r_ids


def training_max_len(max_len: int, model) -> int:
    """The stage's `max_len`, lowered to the model's position limit (a model, config or folder)."""
    from rlhf.lengths import position_limit

    limit = position_limit(model)
    return min(max_len, limit) if limit is not None else max_len


def fitting_groups(groups: list, encoded: list[list]) -> tuple[list, list[list]]:
    """(groups, encoded) without the groups that lost a response to the length limit (an encoding of None):
    a comparison is trained whole or not at all (reward, dpo)."""
    keep = [i for i, enc in enumerate(encoded) if all(e is not None for e in enc)]
    return [groups[i] for i in keep], [encoded[i] for i in keep]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids, mask and labels; padding is IGNORE_INDEX in the labels."""
    from rlhf.batching import right_pad

    ids, mask = right_pad([x for x, _ in examples], pad_id)
    labels, _ = right_pad([y for _, y in examples], IGNORE_INDEX)
    return ids, mask, labels
