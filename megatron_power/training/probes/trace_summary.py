"""What a profiled training step spent its time on, read from the profiler's Chrome trace.

The same code reads a GPU trace and a CPU one. On a GPU the work is the device's kernels, each
attributed through its launch (the profiler's correlation id) to the host calls that made it; on a
CPU the work is each operator's own time (less the operators it calls). Each is put in one
category by its own name and the names of the calls around it (the module whose forward made it,
as StepProfiler annotates it; operators; autograd nodes), first rule that matches:

    communication, optimizer, FP8 casts and amax, MoE routing / permute / dispatch, grouped GEMM,
    attention, GEMM, then norms, elementwise and the rest.

Per profiled step it reports each category's time and share of the device's busy time, the time
the device sat idle while the step ran (the host was behind), the 20 most expensive kernels, the
kernel launches, and the host synchronisations the trace shows (stream / device / event
synchronise calls, device-to-host copies, and `aten::_local_scalar_dense`: `.item()` and friends).

And who issues the work: per module class (the innermost annotation around the call; in the
backward, the autograd node), the host's own time in it (its span less the spans of the modules
and nodes inside it), the kernels it launched and their device time. When the device waits for the
host, the host column says where the host's time goes.
"""

from __future__ import annotations

import collections

STEP_PREFIX = "megatron-power step "  # the record_function around each profiled step

# (category, words in the work's own name, words in the names of the calls around it)
CATEGORIES = [
    ("communication", ("nccl", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter",
                       "alltoall", "all_to_all", "c10d::", "gloo", "broadcast", "sendrecv"), ()),
    # torch's optimizers annotate their step as "Optimizer.step#<class>.step".
    ("optimizer", ("adam", "multi_tensor", "_foreach_"), ("optimizer.step",)),
    ("FP8 casts and amax", ("amax", "fp8", "float8", "quantize", "cast_transpose", "e4m3", "scale_inv"), ()),
    # Around: Megatron's module classes (TopKRouter, MoEAlltoAllTokenDispatcher, TEGroupedMLP,
    # TEDotProductAttention, ...).
    ("MoE routing / permute / dispatch", ("permute", "topk", "moe_", "router"), ("router", "tokendispatcher")),
    ("grouped GEMM", ("grouped",), ("grouped",)),
    ("attention", ("flash", "fmha", "attn", "sdpa", "softmax"), ("dotproductattention",)),
    ("GEMM", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::baddbmm", "aten::matmul"), ()),
]
OTHER = "norms, elementwise, other"
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize"}
SCALAR_READ = "aten::_local_scalar_dense"
_HOST = {"cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"}
_DEVICE = {"kernel", "gpu_memcpy", "gpu_memset"}


def category(name: str, context: list) -> str:
    own = name.lower()
    around = " ".join(context).lower()
    for label, own_words, context_words in CATEGORIES:
        if any(w in own for w in own_words) or any(w in around for w in context_words):
            return label
    return OTHER


def _link_parents(events: list) -> None:
    """Give each host event (of `events`, complete ones) its enclosing host event on the same
    thread (`_parent`), and each operator the time of the operators it calls (`_inner`)."""
    threads = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in _HOST:
            threads[(e.get("pid"), e.get("tid"))].append(e)
    for thread in threads.values():
        thread.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack = []
        for e in thread:
            while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) <= e["ts"]:
                stack.pop()
            e["_parent"] = stack[-1] if stack else None
            if e["cat"] == "cpu_op":
                for outer in reversed(stack):
                    if outer["cat"] == "cpu_op":
                        outer["_inner"] = outer.get("_inner", 0) + e.get("dur", 0)
                        break
            stack.append(e)


BACKWARD = "autograd::engine::evaluate_function: "
OUTSIDE = "outside modules"


def _is_owner(event) -> bool:
    """A module's forward (StepProfiler's annotation by class) or an autograd node's backward."""
    name = event["name"]
    return ((event.get("cat") == "user_annotation" and not name.startswith(STEP_PREFIX))
            or (event.get("cat") == "cpu_op" and name.startswith(BACKWARD)))


def _owner_label(event) -> str:
    name = event["name"]
    return f"{name[len(BACKWARD):]} (backward)" if name.startswith(BACKWARD) else name


def _owner(event):
    """The innermost module or autograd node around a host event (the event itself included)."""
    while event is not None and not _is_owner(event):
        event = event.get("_parent")
    return event


def _by_owner(events: list, work_owners: list, launch_owners: list, n: int, top: int) -> list:
    """Rows of host self time, launches and device time per owner label, most host time first."""
    host = collections.Counter()
    for e in events:
        if _is_owner(e):
            host[_owner_label(e)] += e.get("dur", 0)
            outer = _owner(e.get("_parent"))
            if outer is not None:
                host[_owner_label(outer)] -= e.get("dur", 0)
    device, launched = collections.Counter(), collections.Counter()
    for owner, us in work_owners:
        device[_owner_label(owner) if owner else OUTSIDE] += us
    for owner in launch_owners:
        launched[_owner_label(owner) if owner else OUTSIDE] += 1
    labels = sorted(set(host) | set(device) | set(launched), key=lambda k: (-host[k], -device[k]))
    return [{"issued_by": k, "host_ms_per_step": round(host[k] / n / 1e3, 3),
             "launches_per_step": round(launched[k] / n, 1), "device_ms_per_step": round(device[k] / n / 1e3, 3)}
            for k in labels[:top]]


def _context(event) -> list:
    names = []
    while event is not None:
        names.append(event["name"])
        event = event.get("_parent")
    return names


def _union_length(intervals: list) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize(trace: dict, top: int = 20) -> dict:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    _link_parents(events)
    steps = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith(STEP_PREFIX)]
    if not steps:
        raise ValueError(f"the trace has no '{STEP_PREFIX}N' annotations: it was not written by StepProfiler")
    n = len(steps)
    step_us = sum(e["dur"] for e in steps)

    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    kernels = [e for e in events if e.get("cat") in _DEVICE]
    on_gpu = bool(kernels)
    if on_gpu:  # (name, microseconds, the calls around its launch)
        issuers = [launches.get(e.get("args", {}).get("correlation")) for e in kernels]
        work = [(e["name"], e["dur"], _context(issuer)) for e, issuer in zip(kernels, issuers)]
    else:
        ops = [e for e in events if e.get("cat") == "cpu_op"]
        issuers = [e.get("_parent") for e in ops]
        work = [(e["name"], e["dur"] - e.get("_inner", 0), _context(issuer)) for e, issuer in zip(ops, issuers)]
    work_owners = [(_owner(issuer), us) for issuer, (_, us, _) in zip(issuers, work)]
    # On a GPU the kernel launch calls (copies are not launches); on a CPU each operator.
    launch_owners = ([_owner(e) for e in launches.values() if "Launch" in e["name"]] if on_gpu
                     else [owner for owner, _ in work_owners])
    launch_count = len(launch_owners)

    by_category = collections.Counter()
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for name, us, context in work:
        by_category[category(name, context)] += us
        entry = by_name[name]
        entry[0] += us
        entry[1] += 1
    busy = sum(by_category.values()) or 1.0

    host_calls = collections.Counter(e["name"] for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver", "cpu_op"))
    syncs = {"synchronize calls": sum(host_calls[name] for name in SYNC_CALLS),
             "device-to-host copies": sum(1 for e in kernels if e.get("cat") == "gpu_memcpy" and "DtoH" in e["name"]),
             f"{SCALAR_READ} (.item() and friends)": host_calls[SCALAR_READ]}
    summary = {
        "device": "gpu" if on_gpu else "cpu",
        "steps": n,
        "step_ms": round(step_us / n / 1e3, 3),
        "categories": {label: {"ms_per_step": round(us / n / 1e3, 3), "share": round(us / busy, 4)}
                       for label, us in by_category.most_common()},
        "top": [{"name": name, "ms_per_step": round(us / n / 1e3, 3), "calls_per_step": round(calls / n, 1),
                 "share": round(us / busy, 4)}
                for name, (us, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
        "launches_per_step": round(launch_count / n, 1),
        "syncs_per_step": {k: round(v / n, 1) for k, v in syncs.items()},
        "issued_by": _by_owner(events, work_owners, launch_owners, n, top),
    }
    if on_gpu:  # the device's busy time inside the steps against their length
        windows = [(s["ts"], s["ts"] + s["dur"]) for s in steps]
        inside = [(max(e["ts"], a), min(e["ts"] + e["dur"], b)) for e in kernels for a, b in windows
                  if e["ts"] < b and e["ts"] + e["dur"] > a]
        summary["device_idle_share"] = round(1 - _union_length(inside) / step_us, 4)
    return summary


def markdown(summary: dict, title: str) -> str:
    idle = summary.get("device_idle_share")
    lines = [f"### {title}", "",
             f"{summary['steps']} steps on the {summary['device'].upper()}, {summary['step_ms']:.1f} ms each; "
             f"{summary['launches_per_step']:,.0f} {'kernel launches' if summary['device'] == 'gpu' else 'operators'} per step; "
             + (f"device idle {idle:.1%} of the step." if idle is not None else "no separate device (CPU run)."),
             "", "Host synchronisations per step (profiler): "
             + ", ".join(f"{k} {v:g}" for k, v in summary["syncs_per_step"].items()) + ".", "",
             "| category | ms / step | share of busy time |", "|---|---|---|"]
    lines += [f"| {label} | {c['ms_per_step']:.2f} | {c['share']:.1%} |" for label, c in summary["categories"].items()]
    lines += ["", f"| {len(summary['top'])} most expensive | ms / step | calls / step | share |", "|---|---|---|---|"]
    lines += [f"| `{t['name'][:90]}` | {t['ms_per_step']:.2f} | {t['calls_per_step']:g} | {t['share']:.1%} |"
              for t in summary["top"]]
    if summary.get("issued_by"):
        counted = "launches" if summary["device"] == "gpu" else "operators"
        lines += ["", f"| issued by | host ms / step | {counted} / step | device ms / step |", "|---|---|---|---|"]
        lines += [f"| `{r['issued_by'][:90]}` | {r['host_ms_per_step']:.2f} | {r['launches_per_step']:g} | "
                  f"{r['device_ms_per_step']:.2f} |" for r in summary["issued_by"]]
    sites = summary.get("host_sync_sites")
    if sites is not None:
        lines += ["", f"Synchronising calls from Python, counted on step {summary['counted_step']}: "
                  f"{sum(sites.values())} (probes/host_syncs.py)", "", "| calls | where |", "|---|---|"]
        lines += [f"| {calls} | `{site}` |" for site, calls in sites.items()]
    return "\n".join(lines) + "\n"
