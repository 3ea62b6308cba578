"""Scheduling `kagent refresh` with the system's own scheduler: a crontab line or a systemd user timer.

kagent never runs its own daemon; these helpers only produce (and optionally install) the scheduler entries.
"""
from __future__ import annotations

import hashlib
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


class ScheduleError(ValueError):
    """Bad time or a scheduler that could not be updated."""


@dataclass(frozen=True)
class Plan:
    """What would be installed: crontab line, or systemd unit files keyed by path."""

    crontab_line: str | None = None
    units: dict[Path, str] | None = None

    def describe(self) -> str:
        if self.crontab_line is not None:
            return self.crontab_line
        assert self.units is not None
        return "\n".join(f"# {path}\n{text}" for path, text in self.units.items()).rstrip()


def parse_hhmm(value: str) -> tuple[int, int]:
    match = _HHMM.match(value.strip())
    if not match:
        raise ScheduleError(f"--daily wants HH:MM (24-hour), got {value!r}")
    return int(match.group(1)), int(match.group(2))


def kagent_command(workspace: Path) -> list[str]:
    """The command a scheduler should run: this installation's kagent, on this workspace."""
    script = Path(sys.executable).parent / "kagent"
    exe = [str(script)] if script.exists() else [sys.executable, "-m", "agent"]
    return exe + ["refresh", "--workspace", str(workspace)]


def _tag(workspace: Path) -> str:
    return "kagent-refresh-" + hashlib.sha256(str(workspace).encode()).hexdigest()[:8]


def cron_plan(workspace: Path, daily: str) -> Plan:
    hour, minute = parse_hhmm(daily)
    cmd = shlex.join(kagent_command(workspace))
    log = shlex.quote(str(workspace / "refresh.log"))
    return Plan(crontab_line=f"{minute} {hour} * * * {cmd} >> {log} 2>&1  # {_tag(workspace)}")


def systemd_plan(workspace: Path, daily: str, unit_dir: Path) -> Plan:
    hour, minute = parse_hhmm(daily)
    name = _tag(workspace)
    service = (f"[Unit]\nDescription=kagent refresh of {workspace}\n\n[Service]\nType=oneshot\n"
               f"ExecStart={shlex.join(kagent_command(workspace))}\n")
    timer = (f"[Unit]\nDescription=Daily kagent refresh of {workspace}\n\n[Timer]\n"
             f"OnCalendar=*-*-* {hour:02d}:{minute:02d}:00\nPersistent=true\n\n[Install]\nWantedBy=timers.target\n")
    return Plan(units={unit_dir / f"{name}.service": service, unit_dir / f"{name}.timer": timer})


def install_cron(plan: Plan) -> str:
    """Replace this workspace's line in the user's crontab (other lines are kept)."""
    if shutil.which("crontab") is None:
        raise ScheduleError("`crontab` is not installed; use --systemd or add this line yourself: "
                            + str(plan.crontab_line))
    assert plan.crontab_line is not None
    tag = plan.crontab_line.rsplit("# ", 1)[1]
    current = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    lines = [ln for ln in current.stdout.splitlines() if not ln.endswith(f"# {tag}")] if current.returncode == 0 else []
    new = "\n".join(lines + [plan.crontab_line]) + "\n"
    done = subprocess.run(["crontab", "-"], input=new, capture_output=True, text=True)
    if done.returncode != 0:
        raise ScheduleError(f"crontab refused the new table: {done.stderr.strip()}")
    return f"installed in crontab: {plan.crontab_line}"


def install_systemd(plan: Plan) -> str:
    """Write the unit files and enable the timer when `systemctl --user` is available."""
    assert plan.units is not None
    for path, text in plan.units.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    timer = next(p for p in plan.units if p.suffix == ".timer")
    enable = ["systemctl", "--user", "enable", "--now", timer.name]
    if shutil.which("systemctl") is None:
        return f"wrote {timer.with_suffix('.*')}; enable with: {shlex.join(enable)}"
    subprocess.run(["systemctl", "--user", "daemon-reload"], capture_output=True)
    done = subprocess.run(enable, capture_output=True, text=True)
    if done.returncode != 0:
        return f"wrote {timer.with_suffix('.*')}; enabling failed ({done.stderr.strip()}); run: {shlex.join(enable)}"
    return f"enabled {timer.name}"


def default_unit_dir() -> Path:
    return Path.home() / ".config" / "systemd" / "user"
