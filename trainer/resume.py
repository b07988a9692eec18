"""``onion train --resume RUN``: what a resumed run may change, and its record.

The run is the folder given: its files are addressed relative to it, so a copied run folder resumes
into the copy (``out`` follows the folder). One rule decides every option given with ``--resume``:

* options that do not change what the run learns (:data:`APPLIED_ON_RESUME`: device, evaluation and
  checkpoint cadence, compile, logging, more epochs) are applied, and the change is recorded in
  ``RUN/history.jsonl``;
* any other option that differs from the run's own is refused, naming it (exit 2);
* a larger ``--epochs`` extends the run. From the next epoch boundary (the current epoch, if the run
  stopped inside one, finishes on the schedule it began with) the learning rate follows a new cosine
  from the rate reached there down to ``--min-lr`` at the new last epoch; on a finished run that rate
  is already ``--min-lr``, so the added epochs train at it. (Before the warm-up ends the cosine has not
  begun: the new length simply takes its place.) Fewer epochs are refused: a run is not shortened.
"""
from __future__ import annotations

from dataclasses import replace

from shards import UsageError, location
from trainer import run_folder
from trainer.checkpoint import Position, latest_position
from trainer.config import TrainConfig
from trainer.errors import RunError
from trainer.run_folder import CONFIG, CURATION, read_summary, run_config
from trainer.schedule import lr_factor

# How the run computes, not what it learns: the same weights come out whatever these are (epochs: more
# of the same run, see the module's docstring). Not --loader-workers: the reader splits an epoch's
# examples by worker, so the order of an epoch depends on their number (and mid-epoch, the examples
# still to come were counted by it).
APPLIED_ON_RESUME = ("epochs", "device", "eval_every", "compile", "log_every", "progress_seconds", "checkpoint_every")
WHY_REFUSED = {"loader_workers": "the order of an epoch's examples depends on the number of loader workers"}


def saved_config(run: str) -> TrainConfig:
    """The resolved configuration a run was started with (what ``--resume`` continues)."""
    folder = location(run)
    if folder.exists(CURATION):  # rounds swap the data between phases; plain resume would not
        raise RunError(f"{run} is a curation run: continue it by running the same onion curate command again")
    if not folder.exists(CONFIG):
        raise RunError(f"{run}: no {CONFIG}, so there is no run to resume (a run stopped before its first "
                       "checkpoint leaves nothing to continue: start it again with onion train DATASET --out RUN)")
    return TrainConfig.from_dict(run_config(folder))


def finished_summary(config: TrainConfig) -> dict | None:
    """The summary of a run that trained all of ``config``'s epochs, else None (an extended run that
    stopped in its added epochs still holds the summary of its first end)."""
    summary = read_summary(location(config.out))
    return summary if summary is not None and summary["epochs"] >= config.epochs else None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def same_setting(name: str, saved: object, given: object) -> bool:
    if name == "dataset":  # the same place however it is written (relative path, file:// URL)
        saved_at, given_at = location(str(saved)), location(str(given))
        return (saved_at.protocol, saved_at.root.rstrip("/")) == (given_at.protocol, given_at.root.rstrip("/"))
    return saved == given


def resumed_config(run: str, given: dict) -> tuple[TrainConfig, dict[str, tuple[object, object]]]:
    """The configuration that continues ``run`` with the options ``given`` (flag values and YAML
    settings; None: not given), and what changed ({setting: (before, now)}); raises UsageError
    naming each option that would change what the run learns."""
    saved = saved_config(run)
    given = {name: value for name, value in given.items() if value is not None}
    if "out" in given and not same_setting("dataset", given.pop("out"), run):
        raise UsageError(f"--out: --resume continues the run folder it is given ({run}); leave --out out")
    changed = {name: (getattr(saved, name), value) for name, value in given.items()
               if not same_setting(name, getattr(saved, name), value)}
    refused = [name for name in changed if name not in APPLIED_ON_RESUME]
    if refused:
        shown = ", ".join(f"{flag(name)} ({changed[name][1]!r}; the run has {changed[name][0]!r})" for name in refused)
        why = "; ".join(WHY_REFUSED[name] for name in refused if name in WHY_REFUSED)
        raise UsageError(f"{run}: --resume cannot change {shown}: it would change what the run learns"
                         f"{f' ({why})' if why else ''}. "
                         f"Resuming applies only {', '.join(map(flag, APPLIED_ON_RESUME))}; start a new run "
                         "with --out for other settings")
    position = latest_position(location(run))
    config = replace(saved, out=run, **{name: now for name, (_, now) in changed.items()})
    if "epochs" in changed:
        config.extensions = [*saved.extensions, *extension(saved, position, config.epochs, run)]
    if saved.out != run:
        changed["out"] = (saved.out, run)
    return config, changed


def extension(saved: TrainConfig, position: Position | None, epochs: int, run: str) -> list[dict]:
    """The record of extending ``saved`` to ``epochs`` (empty while its cosine has not begun)."""
    if epochs < saved.epochs:
        trained = position.epoch if position else 0
        raise UsageError(f"{run}: --epochs {epochs} is fewer than the run's {saved.epochs} (it has trained "
                         f"{trained}): a resumed run can be extended with a larger --epochs, not shortened")
    at = 0 if position is None else position.epoch + (1 if position.batch else 0)  # the next epoch boundary
    if at <= saved.warmup_epochs:
        return []
    return [{"at_epoch": at, "lr_factor": lr_factor(saved, at), "epochs_before": saved.epochs}]


def record_resume(config: TrainConfig, changed: dict[str, tuple[object, object]], command: list[str]) -> None:
    """Record this resume, and the configuration it continues with, in ``RUN/history.jsonl`` (see
    :func:`trainer.run_folder.record_resume`)."""
    run_folder.record_resume(location(config.out), config.to_dict(), changed, command)
