"""Kill the line's owner again and again; does the standby always take over, losing nothing?

Runs the simulators of tests/standby.py's line (Modbus and OPC UA) in this process and two
`linectl run` processes on one fresh PostgreSQL database: an owner and a `--standby`. At a
random moment (after 1 to 4 more cycles anywhere on the line) the owner is killed: `kill -9`,
or every third time frozen with SIGSTOP (and killed once replaced). The standby takes over and
a new standby is started; repeat. At the end the last owner runs the line to `release.count`,
and the trace is checked against the simulators' own execution counters.

    .venv/bin/python bench/kill_soak.py [--kills 10] [--lease-s 2] [--seed 1]

Prints units lost, steps run twice, and the takeover time: from the moment the old owner's
lease expired (database time) to the new owner's first command, p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from tests.conservation import conservation  # noqa: E402
from tests.helpers import eventually  # noqa: E402
from tests.standby import FIRST_COMMAND, Controller, cycles, plant, trace  # noqa: E402

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def wait_cycles(sim, more: int, owner: Controller) -> None:
    target = cycles(sim) + more
    await eventually(
        lambda: cycles(sim) >= target or owner.proc.returncode is not None,
        within=60,
        what=f"{more} more cycles",
    )


async def soak(kills: int, lease_s: float, seed: int, units: int) -> int:
    rng = random.Random(seed)
    name = f"soak_{secrets.token_hex(3)}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db = f"postgresql://postgres@127.0.0.1:5432/{name}"
    takeovers: list[float] = []
    killed_to_command: list[float] = []
    frozen = 0
    procs: list[Controller] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # A unit every ~0.6 s: a round (a standby starting, a kill, a takeover) takes a few
            # seconds, so the line must still be running after the last kill.
            plant_ = plant(Path(tmp), db, name=name, units=units, time_scale=0.2)
            async with plant_ as (sim, config):
                lease = ["--lease-s", str(lease_s)]
                owner = await Controller.start(config, *lease, name="owner 0")
                procs.append(owner)
                await owner.said("running line")
                done = 0
                unplanned: list[str] = []
                i = 0
                while done < kills:
                    i += 1
                    standby = await Controller.start(config, "--standby", *lease, name=f"s{i}")
                    procs.append(standby)
                    ready = await standby.said("standing by for its lease|running line", within=60)
                    if "running line" in ready[0] or owner.proc.returncode is not None:
                        # The owner ended by itself (not our kill): it lost its lease, say,
                        # to another program ending its database sessions. Carry on.
                        unplanned.append(f"{owner.name}: {owner.lines[-1] if owner.lines else ''}")
                        await owner.close()
                        owner = standby
                        if "running line" not in ready[0]:
                            await standby.said(FIRST_COMMAND, within=60)
                        continue
                    await wait_cycles(sim, rng.randint(1, 4), owner)
                    if owner.proc.returncode is not None:
                        continue  # as above, at the next standby
                    freeze = (done + 1) % 3 == 0
                    killed_at = time.monotonic()
                    owner.signal(signal.SIGSTOP if freeze else signal.SIGKILL)
                    took = await standby.said(FIRST_COMMAND, within=60)
                    killed_to_command.append(time.monotonic() - killed_at)
                    takeovers.append(float(took[1]))
                    if freeze:
                        frozen += 1
                        owner.signal(signal.SIGKILL)
                    await owner.close()
                    owner = standby
                    done += 1
                    print(
                        f"kill {done:3d} ({'SIGSTOP' if freeze else 'kill -9'}): first command "
                        f"{takeovers[-1]:.2f} s after the lease expired, "
                        f"{killed_to_command[-1]:.2f} s after the kill",
                        flush=True,
                    )
                code = await owner.exited(within=600)
                if code != 0:
                    # Not a kill of ours: say why, and restart it as an operator would.
                    print(f"{owner.name} exited {code}: {owner.lines[-1] if owner.lines else ''}")
                    owner = await Controller.start(config, *lease, name="restart")
                    procs.append(owner)
                    code = await owner.exited(within=600)
                    print(f"restarted, it ran the line to its end and exited {code}")
                found = conservation(await trace(db, name), sim.completions())
    finally:
        for proc in procs:
            await proc.close()
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    # Released and then neither finished nor quarantined (the last owner ran to the end).
    lost = len(found.lost)
    print()
    print(
        f"{done} takeovers ({done - frozen} kill -9, {frozen} SIGSTOP), lease {lease_s:g} s, "
        f"{found.units} of {units} units released: {found.finished} finished, "
        f"{found.quarantined} quarantined"
    )
    print(f"units lost: {lost}")
    print(f"steps run twice: {len(found.twice)}")
    print(
        f"other trace problems (unrecorded, phantom, sequence backwards): "
        f"{len(found.unrecorded) + len(found.phantom) + len(found.seq_backwards)}"
    )
    if takeovers:
        print(
            f"takeover, lease expiry to first command: p50 {percentile(takeovers, 50):.2f} s, "
            f"p99 {percentile(takeovers, 99):.2f} s, max {max(takeovers):.2f} s"
        )
        print(
            f"kill to first command: p50 {percentile(killed_to_command, 50):.2f} s, "
            f"p99 {percentile(killed_to_command, 99):.2f} s "
            f"(mean {statistics.mean(killed_to_command):.2f} s)"
        )
    if unplanned:
        print(f"owners that ended by themselves (the standby took over): {len(unplanned)}")
        for why in unplanned[:5]:
            print("  ", why[:200])
    for problem in found.problems[:10]:
        print("  ", problem)
    return 1 if lost or found.problems or found.units < units else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="owners to kill (200 for a soak)")
    parser.add_argument("--lease-s", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--units", type=int, help="release.count (default: 12 per kill + 30)")
    args = parser.parse_args()
    count = args.units or args.kills * 12 + 30
    sys.exit(asyncio.run(soak(args.kills, args.lease_s, args.seed, count)))
