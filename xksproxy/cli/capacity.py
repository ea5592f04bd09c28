"""``capacity``: measure each configured HSM and size the fleet for a request rate
(docs/operations/capacity.md; the model is :mod:`xksproxy.capacity`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from xksproxy.cli.common import CliError, config_of
from xksproxy.config import Config, default_workers

if TYPE_CHECKING:
    from xksproxy.capacity import HsmMeasurement, Plan, Step


def cmd_capacity(args: argparse.Namespace) -> int:
    from xksproxy import log
    from xksproxy.capacity import ProxyShape, plan, plan_json, time_bound

    config = config_of(args)
    for hsm in config.hsms:
        hsm.read_pin()  # an unreadable PIN is a configuration error (78), before anything opens
    bounds = [args.max_concurrency or h.max_pool_size for h in config.hsms]
    log.configure("critical", sys.stderr)  # the one error line says what went wrong
    longest = sum(time_bound(1, b, args.step_seconds) for b in bounds)
    _out(
        f"capacity plan for {args.rate:g} requests/s (Encrypt and Decrypt: one HSM operation each)"
    )
    _out("")
    _out(
        f"measuring {len(config.hsms)} HSM(s) in turn on the health key, as the proxy calls them "
        f"(init + Encrypt or Decrypt): concurrency 1, 2, 4 ... up to {'/'.join(map(str, bounds))}, "
        f"{args.step_seconds:g} s a step, at most {longest:.0f} s once the HSMs are open"
    )
    measured = asyncio.run(_measure_all(config, bounds, args.step_seconds))
    shape = ProxyShape(
        workers=config.server.workers,
        cpus=default_workers(),  # the CPUs this process may run on
        max_pool_size=min(h.max_pool_size for h in config.hsms),
        pool_size=min(h.pool_size for h in config.hsms),
    )
    result = plan(args.rate, measured, shape, http_cpu_us=args.http_cpu_us)
    for line in plan_lines(result, len(measured)):
        _out(line)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(plan_json(result, measured), indent=2) + "\n")
        except OSError as exc:
            raise CliError(f"--json {args.json}: {exc.strerror or exc}") from exc
    return 0


def _out(line: str) -> None:
    print(line, flush=True)  # as it comes: the steps take seconds each


async def _measure_all(
    config: Config, bounds: Sequence[int], step_seconds: float
) -> list[HsmMeasurement]:
    """Open every HSM as the proxy does, with a fixed pool as large as the steps' bound, probe
    each (CapacityError naming the first that is UNAVAILABLE), then measure them in turn."""
    from xksproxy.app import CLOSE_TIMEOUT, close_proxy, open_proxy, probe_timeout
    from xksproxy.capacity import CapacityError, measure

    sized = dataclasses.replace(
        config,
        hsms=tuple(
            dataclasses.replace(h, pool_size=b, max_pool_size=b)
            for h, b in zip(config.hsms, bounds, strict=True)
        ),
    )
    proxy = await open_proxy(sized)
    try:
        for hsm in proxy.hsms:
            await hsm.warm(hsm.health_key)
            health = await proxy.service.board.probe_once(hsm, probe_timeout(config))
            if health.state.value == "UNAVAILABLE":
                raise CapacityError(f"hsm {hsm.name}: UNAVAILABLE: {health.detail}")
        measured = []
        _out(f"  {'HSM':<14} {'CONC':>4} {'OPS/S':>8} {'P50 MS':>7} {'P99 MS':>7} {'CPU US/OP':>9}")
        for hsm, bound in zip(proxy.hsms, bounds, strict=True):
            m = await measure(
                hsm,
                hsm.health_key,
                model=hsm.model,
                iv_mode=hsm.gcm_detail,
                bound=bound,
                step_seconds=step_seconds,
                deadline_s=config.server.request_deadline_ms / 1000,
                on_step=_step_printer(hsm.name),
            )
            _out(f"  {hsm_summary(m)}")
            measured.append(m)
        return measured
    finally:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(close_proxy(proxy), CLOSE_TIMEOUT)


def _step_printer(name: str) -> Callable[[Step], None]:
    def show(s: Step) -> None:
        _out(f"  {step_row(name, s)}")

    return show


def step_row(name: str, s: Step) -> str:
    row = (
        f"{name:<14} {s.concurrency:>4} {s.ops_per_second:>8.0f} {s.p50_ms:>7.2f} "
        f"{s.p99_ms:>7.2f} {s.cpu_us_per_op:>9.0f}"
    )
    from xksproxy.capacity import CPU_BOUND_BUSY

    if s.cpu_busy >= CPU_BOUND_BUSY:
        row += "  (this process out of CPU)"
    if s.errors:
        row += f"  {s.errors} failed: {s.error_detail}"
    return row


def hsm_summary(m: HsmMeasurement) -> str:
    from xksproxy.capacity import LIMIT_TEXT

    return (
        f"{m.name} ({m.model}; {m.iv_mode}): {m.op_seconds * 1000:.2f} ms per operation "
        f"(mean, one at a time); {m.max_ops:.0f} operations/s, {LIMIT_TEXT[m.limit]}"
    )


def plan_lines(p: Plan, hsms: int) -> list[str]:
    """The figures and the plan, after the measured steps."""
    from xksproxy.capacity import BOUND_TEXT

    shape = p.shape
    lower = " (at least)" if p.hsm_bound_is_lower else ""
    carry = "carries" if p.survivors == 1 else "carry"
    out = [
        "",
        f"one proxy: {shape.workers} workers on {shape.cpus} CPUs, max_pool_size "
        f"{shape.max_pool_size}, {hsms} HSM(s)",
        f"  CPU per request   {p.cpu_us_per_request:>7.0f} us at the maximum: {p.http_cpu_us:.0f} "
        f"outside the HSM calls (--http-cpu-us) + {p.hsm_cpu_us:.0f} for them (measured with "
        f"{p.in_flight:.1f} in flight per worker per HSM)",
        f"  one worker        {p.per_worker_max:>7.0f} requests/s (a core)",
        f"  CPU bound         {p.cpu_bound:>7.0f} requests/s ({shape.cores} cores)",
        f"  sessions bound    {p.session_bound:>7.0f} requests/s ({shape.workers} workers x "
        f"{shape.max_pool_size} sessions / {p.op_ms:.2f} ms, per HSM)",
        f"  HSM bound         {p.hsm_bound:>7.0f} requests/s{lower}",
        f"  maximum           {p.proxy_max:>7.0f} requests/s, set by {BOUND_TEXT[p.proxy_limit]}",
        f"  planned           {p.proxy_planned:>7.0f} requests/s (its CPU and sessions, with the "
        "headroom below; the HSMs are planned apart)",
        "",
        f"for {p.rate:g} requests/s",
        f"  proxies           {p.proxies:>7} ({p.rate_per_proxy:.0f} requests/s each)",
        f"  workers           {p.workers:>7} per proxy (now {shape.workers})",
        f"  HSMs (N+1)        {p.hsms:>7} (with one lost, {p.survivors} {carry} the rate; each "
        f"does {'at least ' if p.hsm_bound_is_lower else ''}{p.per_hsm_max:.0f} operations/s)",
        f"  sessions          {p.sessions:>7} per proxy per HSM ({p.sessions_busy:.1f} busy on "
        "average with one HSM lost)",
        f"  pool_size         {p.pool_size:>7} (per worker per HSM; now {shape.pool_size})",
        f"  HSM sessions      {p.hsm_sessions:>7} per HSM from the whole fleet at that pool_size "
        "(logins included): within the HSM's session limit?",
        "  headroom: " + "; ".join(p.headroom.describe()),
    ]
    out += [f"  note: {note}" for note in p.notes]
    out += [
        "",
        f"# one proxy's predicted maximum: {p.proxy_max:.0f} requests/s, set by "
        f"{BOUND_TEXT[p.proxy_limit]}; a model: check it with loadtest on a rig like yours "
        "(docs/operations/capacity.md)",
    ]
    return out
