"""The ONNX backend node suite through edgec: every case of `onnx.backend.test.loader.load_node_model_tests()`
built for the host with edgec's import, pass pipeline and code generation, run in process, and checked with the
backend-test rule (rtol 1e-3, atol 1e-7, NaN equals NaN, shape and dtype must match); onnxruntime runs the
same case beside it.

    python bench/onnx_suite.py                 # all cases -> bench/onnx_suite.md and bench/onnx_suite.json
    python bench/onnx_suite.py --filter Cast   # the cases of one operator (or whose name contains the text)

The onnx wheel ships no test data files: the loader runs the case generators in `onnx.backend.test.case.node`,
which build each model, its inputs and the expected outputs in memory (seeded here, so a run is reproducible).
Each worker process generates them once and receives case names; a case that overruns `--timeout` or kills
its worker is recorded at the stage it reached, and a fresh worker takes the next case.

edgec's outcome per case: pass; unsupported (edgec refused it with its own error); import error, compile error,
runtime error (a foreign exception, a crash or a timeout at that stage); wrong (it ran and the numbers, shape or
dtype differ). onnxruntime's: pass, fails (refuses or crashes), wrong. `--known FILE` (the CI test's list,
bench/onnx_suite_known.toml) makes the run fail on a wrong result it does not list, and on a listed one that
is no longer wrong.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import re
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RTOL, ATOL = 1e-3, 1e-7                 # onnx's backend-test tolerance (TestCase.rtol/atol default)
SEED = 0
EDGEC_OUTCOMES = ("pass", "unsupported", "import error", "compile error", "runtime error", "wrong")
ORT_OUTCOMES = ("pass", "fails", "wrong")
_STAGE_ERROR = {"import": "import error", "compile": "compile error", "run": "runtime error"}
TRAINING_DOMAIN = "ai.onnx.preview.training"
MAX_IR_SUBSET = 13                      # the cases onnxruntime's IR support covers, reported apart


@dataclass
class CaseResult:
    name: str
    op: str
    ir_version: int
    training: bool
    edgec: str
    edgec_detail: str = ""
    ort: str = ""
    ort_detail: str = ""
    seconds: float = 0.0

    @property
    def subset(self) -> bool:
        """IR version <= 13 and not a training operator or mode: the issue's comparable subset."""
        return self.ir_version <= MAX_IR_SUBSET and not self.training


# ---------------------------------------------------------------------------------------------------- the cases
def load_cases() -> dict:
    """name -> onnx TestCase, generated with a fixed seed (the generators draw random inputs)."""
    import warnings

    from onnx.backend.test.loader import load_node_model_tests

    np.random.seed(SEED)
    with warnings.catch_warnings():   # the generators divide by zero on purpose
        warnings.simplefilter("ignore")
        return {c.name: c for c in load_node_model_tests()}


def _case_info(cases: dict) -> dict[str, tuple[str, int, bool, set[str]]]:
    """name -> (operator, IR version, training, its parameter inputs). An "_expanded" case (the operator's
    function body inlined) is counted under its operator, and shares its parameter inputs."""
    info = {}
    for name, case in cases.items():
        nodes = case.model.graph.node
        base = cases.get(re.sub(r"_expanded(_ver\d+)?$", "", name))
        node = base.model.graph.node[0] if base is not None and len(nodes) != 1 else nodes[0]
        training = "training" in name or any(n.domain == TRAINING_DOMAIN for n in nodes)
        opsets = (base or case).model.opset_import
        info[name] = (node.op_type, case.model.ir_version, training, parameter_inputs(node, opsets))
    return info


# A node's inputs that exports hold as constants (shapes, axes, pads, sizes, thresholds...): the suite's
# generators make them graph inputs, which TVM's importer needs as constants. edgec folds them as `--const-input`
# does, so the case tests the operator, not the input's constness.
PARAMETER_INPUTS = {"shape", "axes", "pads", "scales", "sizes", "split", "repeats", "starts", "ends", "steps", "k",
                    "axis", "size", "depth", "ratio", "training_mode", "constant_value", "roi",
                    "max_output_boxes_per_class", "iou_threshold", "score_threshold", "block_shape", "image_shape",
                    "output_shape", "dft_length", "frame_length", "frame_step", "num_mel_bins", "sample_rate",
                    "lower_edge_hertz", "upper_edge_hertz"}


# Names too common to fold everywhere (Attention's K is data): only for these operators.
OP_PARAMETER_INPUTS = {("TopK", "K"), ("ConstantOfShape", "input"), ("Loop", "M"), ("Loop", "cond")}


def parameter_inputs(node, opset_import) -> set[str]:
    """The tensor names `node` reads in one of its schema's PARAMETER_INPUTS positions."""
    import onnx

    version = next((o.version for o in opset_import if o.domain == node.domain), None)
    try:
        formal = onnx.defs.get_schema(node.op_type, version, node.domain).inputs
    except onnx.defs.SchemaError:
        return set()
    def parameter(formal_name):
        return formal_name in PARAMETER_INPUTS or (node.op_type, formal_name) in OP_PARAMETER_INPUTS

    return {name for i, name in enumerate(node.input) if name and formal and parameter(formal[min(i, len(formal) - 1)].name)}


def prepared(case, parameters: set[str]):
    """The case's model, its inputs by name, the parameter inputs among them to fold (`--const-input`), and its
    expected outputs."""
    inputs, outputs = case_data(case)
    initializers = {t.name for t in case.model.graph.initializer}
    feeds = dict(zip([i.name for i in case.model.graph.input if i.name not in initializers], inputs))
    consts = {n: v for n, v in feeds.items() if n in parameters and isinstance(v, np.ndarray)}
    return case.model, feeds, consts, outputs


def case_data(case) -> tuple[list, list]:
    """A case's inputs and expected outputs as numpy arrays (lists for sequences): some generators store
    TensorProtos, for the dtypes numpy has no type of its own for (float8, int4, ...; onnx reads them as
    ml_dtypes arrays)."""
    from onnx import TensorProto, numpy_helper

    def convert(value):
        if isinstance(value, TensorProto):
            return numpy_helper.to_array(value)
        return [convert(v) for v in value] if isinstance(value, (list, tuple)) else value

    inputs, outputs = case.data_sets[0]
    return convert(inputs), convert(outputs)


def select(info: dict, filters: list[str]) -> list[str]:
    if not filters:
        return sorted(info)
    wanted = [f.lower() for f in filters]
    return sorted(n for n, (op, *_) in info.items()
                  if op.lower() in wanted or any(w.startswith("test_") and n.startswith(w) for w in wanted))


# ------------------------------------------------------------------------------------------------ comparison
def _as_numpy(value):
    """A VM result (tensor, tuple of them, nested) as numpy arrays and lists."""
    if hasattr(value, "numpy"):
        return value.numpy()
    return [_as_numpy(v) for v in value]


def mismatch(out, ref) -> str | None:
    """None when `out` matches `ref` under the backend-test rule, else what differs."""
    if isinstance(ref, (list, tuple)) or isinstance(out, (list, tuple)):
        if not isinstance(ref, (list, tuple)) or not isinstance(out, (list, tuple)) or len(out) != len(ref):
            return f"sequence expected {_kind(ref)}, got {_kind(out)}"
        return next((f"[{i}] {m}" for i, (o, r) in enumerate(zip(out, ref)) if (m := mismatch(o, r))), None)
    if ref is None or out is None:
        return None if ref is None and out is None else f"expected {_kind(ref)}, got {_kind(out)}"
    out, ref = np.asarray(out), np.asarray(ref)
    if out.shape != ref.shape:
        return f"shape {list(out.shape)}, expected {list(ref.shape)}"
    if ref.dtype == object or ref.dtype.kind in "SU":
        return None if np.array_equal(out.astype(str), ref.astype(str)) else "strings differ"
    if out.dtype != ref.dtype:
        return f"dtype {out.dtype}, expected {ref.dtype}"
    rtol = max(RTOL, 2**-6) if ref.dtype.name == "bfloat16" else RTOL   # two bfloat16 ULPs, as onnx's runner
    o, r = out.astype(np.float64), ref.astype(np.float64)
    close = np.isclose(o, r, rtol=rtol, atol=ATOL, equal_nan=True)
    if close.all():
        return None
    bad = np.argwhere(~close)
    at = tuple(int(i) for i in bad[0])
    return f"{len(bad)}/{close.size} elements differ, e.g. at {list(at)}: {o[at]!r} vs expected {r[at]!r}"


def _kind(value) -> str:
    if value is None:
        return "none"
    return f"a sequence of {len(value)}" if isinstance(value, (list, tuple)) else f"a tensor {np.shape(value)}"


def compare_all(outs, refs) -> str | None:
    if len(outs) != len(refs):
        return f"{len(outs)} outputs, expected {len(refs)}"
    return next((f"output {i}: {m}" for i, (o, r) in enumerate(zip(outs, refs)) if (m := mismatch(o, r))), None)


# -------------------------------------------------------------------------------------------- running a case
def _refusal(error: BaseException) -> bool:
    """edgec refused the model itself: an EdgecError that does not wrap a foreign (TVM, onnx) exception and is
    not one of its "internal error" reports."""
    from edgec.errors import EdgecError

    return (isinstance(error, EdgecError) and not isinstance(error.__cause__, Exception)
            and not error.message.startswith("internal error"))


def _one_line(error: BaseException) -> str:
    from edgec.errors import last_line

    return (str(error) if _refusal(error) else f"{type(error).__name__}: {last_line(error)}")[:300]


class EdgecHost:
    """edgec for the host, as `edgec build` runs it up to code generation: the same plan, import steps and
    compile_model (-O2 and the descriptor's offload), then the executable in process instead of a bundle."""

    def __init__(self):
        from edgec.context import BuildContext, BuildOptions
        from edgec.offload import for_target
        from edgec.passes import plan
        from edgec.targets import load_target

        target = load_target("host")
        self.ctx = BuildContext(target, BuildOptions(), offload=for_target(target))
        self.steps = plan(self.ctx, "onnx")
        self.import_steps = tuple(s.name for s in self.steps if s.phase == "import" and s.enabled)

    def run(self, model, inputs: list, workdir: Path, stage, consts: dict | None = None) -> list:
        """`inputs`: the values of the model's graph inputs not in `consts`, in order; `consts` are folded."""
        import onnx
        import tvm
        from tvm import relax

        from edgec.build import compile_model, export_library
        from edgec.frontends import load_model
        from edgec.offload import used

        path = workdir / "model.onnx"
        onnx.save(model, path)
        consts = consts or {}
        initializers = {t.name for t in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in initializers and i.name not in consts]
        stage("import")
        shapes = {n: tuple(a.shape) for n, a in zip(names, inputs) if isinstance(a, np.ndarray)}
        imported = load_model(path, shapes, self.import_steps, const_inputs=consts)
        stage("compile")
        compiled = compile_model(imported, self.ctx, self.steps)
        executable = compiled.executable
        if used(compiled.offload):       # offloaded kernels are C++ compiled at link time: run the linked library
            export_library(compiled, workdir / "model.so")
            executable = tvm.runtime.load_module(str(workdir / "model.so"))
        stage("run")
        vm = relax.VirtualMachine(executable, tvm.cpu())
        weights = [tvm.runtime.tensor(v) for v in compiled.params.values()]
        if compiled.load:                # offload's main_load packs the weights once, as a bundle's load
            weights = list(vm[compiled.load](*weights))
        args = [tvm.runtime.tensor(np.asarray(a)) for a in inputs] + weights
        result = _as_numpy(vm["main"](*args))
        return result if len(model.graph.output) != 1 else [result]


def _ort(model, inputs: list, expected: list) -> tuple[str, str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feeds = {i.name: a for i, a in zip(sess.get_inputs(), inputs)}
        outputs = sess.run(None, feeds)
    except Exception as e:  # onnxruntime's own exception types for a model or an input it refuses
        return "fails", _one_line(e)
    problem = compare_all(outputs, expected)
    return ("wrong", problem) if problem else ("pass", "")


def _worker(conn) -> None:
    """Runs cases named on `conn`; sends ("stage", name) as it goes, then ("edgec", outcome, detail) and
    ("ort", outcome, detail), so a crash or a timeout is attributed to the stage it happened in."""
    import tempfile

    os.environ["TVM_NUM_THREADS"] = "1"          # one core per worker: --jobs sets how many the suite uses
    devnull = os.open(os.devnull, os.O_WRONLY)   # TVM's and onnxruntime's chatter; the results say what failed
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    cases = load_cases()
    info = _case_info(cases)
    edgec = EdgecHost()
    conn.send(("ready",))
    while True:
        name = conn.recv()
        if name is None:
            return
        model, feeds, consts, expected = prepared(cases[name], info[name][3])
        with tempfile.TemporaryDirectory(prefix="onnx-suite-") as tmp:
            stage = "import"

            def enter(s):
                nonlocal stage
                stage = s
                conn.send(("stage", s))

            try:
                outputs = edgec.run(model, [v for n, v in feeds.items() if n not in consts], Path(tmp), enter, consts)
                problem = compare_all(outputs, expected)
                conn.send(("edgec", "wrong", problem) if problem else ("edgec", "pass", ""))
            except Exception as e:  # every failure is a result of the suite, classified by the stage it stopped at
                conn.send(("edgec", "unsupported" if _refusal(e) else _STAGE_ERROR[stage], _one_line(e)))
        conn.send(("stage", "onnxruntime"))
        conn.send(("ort",) + _ort(model, list(feeds.values()), expected))


class _Pool:
    """Worker processes, each running one case at a time; killed and replaced on a timeout or a crash."""

    def __init__(self, jobs: int, timeout: float):
        self.mp = multiprocessing.get_context("spawn")   # TVM's thread pool does not survive fork
        self.timeout = timeout
        self.workers = [self._start() for _ in range(jobs)]

    def _start(self):
        parent, child = self.mp.Pipe()
        proc = self.mp.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "case": None, "ready": False}

    def run(self, names: list[str], info: dict, progress) -> list[CaseResult]:
        todo, results = list(reversed(names)), []
        while todo or any(w["case"] for w in self.workers):
            for w in self.workers:
                if w["ready"] and w["case"] is None and todo:
                    name = todo.pop()
                    op, ir, training, _ = info[name]
                    w.update(case=CaseResult(name, op, ir, training, ""), stage="import", started=time.monotonic())
                    w["conn"].send(name)
            busy = [w for w in self.workers if w["case"]]
            deadline = min((w["started"] + self.timeout for w in busy), default=time.monotonic() + 60)
            ready = wait([w["conn"] for w in self.workers], timeout=max(0.0, deadline - time.monotonic()))
            for i, w in enumerate(self.workers):
                if w["conn"] in ready:
                    try:
                        message = w["conn"].recv()
                    except (EOFError, ConnectionError):
                        if not w["ready"]:
                            raise RuntimeError("a suite worker died while starting; run one case with --jobs 1 "
                                               "and look at its stderr") from None
                        w["proc"].join(5)
                        self._lost(i, f"the worker died (exit code {w['proc'].exitcode})", results, progress)
                        continue
                    self._message(w, message, results, progress)
                elif w["case"] and time.monotonic() - w["started"] > self.timeout:
                    self._lost(i, f"timed out after {self.timeout:.0f} s", results, progress)
        return results

    def _message(self, w, message, results, progress) -> None:
        kind, *rest = message
        case = w["case"]
        if kind == "ready":
            w["ready"] = True
        elif kind == "stage":
            w["stage"] = rest[0]
        elif kind == "edgec":
            case.edgec, case.edgec_detail = rest
        elif kind == "ort":
            case.ort, case.ort_detail = rest
            self._finish(w, results, progress)

    def _lost(self, i: int, why: str, results, progress) -> None:
        w = self.workers[i]
        w["proc"].kill()
        w["proc"].join()
        case = w["case"]
        if case is not None:
            if w["stage"] == "onnxruntime":
                case.ort, case.ort_detail = "fails", why
            else:
                case.edgec, case.edgec_detail = _STAGE_ERROR[w["stage"]], why
                case.ort, case.ort_detail = "fails", "not run: the worker was lost on edgec's side"
            self._finish(w, results, progress)
        self.workers[i] = self._start()

    @staticmethod
    def _finish(w, results, progress) -> None:
        case = w["case"]
        case.seconds = round(time.monotonic() - w["started"], 2)
        results.append(case)
        progress(case)
        w["case"] = None

    def close(self) -> None:
        for w in self.workers:
            try:
                w["conn"].send(None)
            except (BrokenPipeError, OSError):
                pass
            w["proc"].join(5)
            if w["proc"].is_alive():
                w["proc"].kill()


def run_suite(filters: list[str] = (), jobs: int = 1, timeout: float = 120.0, progress=None) -> list[CaseResult]:
    info = _case_info(load_cases())
    names = select(info, list(filters))
    pool = _Pool(jobs, timeout)
    try:
        results = pool.run(names, info, progress or (lambda case: None))
    finally:
        pool.close()
    return sorted(results, key=lambda r: r.name)


# -------------------------------------------------------------------------------------------- known issues
def load_known(path: Path) -> dict[str, str]:
    """case name -> reason, from the known-issues TOML ([wrong] table)."""
    return dict(tomllib.loads(path.read_text()).get("wrong", {}))


def check_known(results: list[CaseResult], known: dict[str, str]) -> list[str]:
    """Problems: wrong results not listed, and listed cases that ran and are not wrong any more."""
    ran = {r.name: r for r in results}
    problems = [f"{r.name}: wrong result not in the known-issues list ({r.edgec_detail})"
                for r in results if r.edgec == "wrong" and r.name not in known]
    problems += [f"{name}: listed as a known wrong result but now '{ran[name].edgec}'; remove it from the list"
                 for name in known if name in ran and ran[name].edgec != "wrong"]
    return problems


# ---------------------------------------------------------------------------------------------------- report
def _counts(results, field: str, outcomes) -> dict[str, int]:
    c = collections.Counter(getattr(r, field) for r in results)
    return {o: c.get(o, 0) for o in outcomes}


def _pct(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.1f}%)" if total else "0"


def totals(results) -> dict:
    groups = {"all cases": results, f"IR <= {MAX_IR_SUBSET}, not training": [r for r in results if r.subset]}
    return {label: {"cases": len(rs), "edgec": _counts(rs, "edgec", EDGEC_OUTCOMES),
                    "onnxruntime": _counts(rs, "ort", ORT_OUTCOMES)} for label, rs in groups.items()}


def markdown(results, header: str) -> str:
    lines = [header, "", "## Totals", "",
             "| cases | n | edgec pass | unsupported | import error | compile error | runtime error | **wrong** "
             "| onnxruntime pass | ort fails | ort wrong |", "|---" * 11 + "|"]
    for label, t in totals(results).items():
        n, e, o = t["cases"], t["edgec"], t["onnxruntime"]
        lines.append(f"| {label} | {n} | {_pct(e['pass'], n)} | {e['unsupported']} | {e['import error']} | "
                     f"{e['compile error']} | {e['runtime error']} | **{e['wrong']}** | {_pct(o['pass'], n)} | "
                     f"{o['fails']} | {o['wrong']} |")
    lines += ["", "## Per operator", "", "| operator | cases | pass | unsupported | import error | compile error "
              "| runtime error | wrong | ort pass | ort fails | ort wrong |", "|---" * 11 + "|"]
    by_op = collections.defaultdict(list)
    for r in results:
        by_op[r.op].append(r)
    for op in sorted(by_op, key=str.lower):
        rs = by_op[op]
        e, o = _counts(rs, "edgec", EDGEC_OUTCOMES), _counts(rs, "ort", ORT_OUTCOMES)
        lines.append(f"| {op} | {len(rs)} | " + " | ".join(str(e[k]) for k in EDGEC_OUTCOMES) + " | "
                     + " | ".join(str(o[k]) for k in ORT_OUTCOMES) + " |")
    wrong = [r for r in results if r.edgec == "wrong"]
    lines += ["", f"## Wrong results ({len(wrong)})", ""]
    lines += [f"- `{r.name}`: {r.edgec_detail}" for r in wrong] or ["none"]
    return "\n".join(lines) + "\n"


def _environment() -> str:
    from importlib.metadata import version

    return (f"onnx {version('onnx')}, onnxruntime {version('onnxruntime')}, TVM {version('apache-tvm')}, "
            f"edgec {version('edgec')}; host target, -O2, the descriptor's offload; "
            f"tolerance rtol {RTOL:g}, atol {ATOL:g}, NaN equals NaN, shape and dtype must match")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", "-j", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--filter", action="append", default=[], metavar="OP",
                        help="only this operator's cases, or (test_...) the cases whose name starts so (repeatable)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per case (default 120)")
    parser.add_argument("--markdown", type=Path, help="table file (default bench/onnx_suite.md without --filter)")
    parser.add_argument("--json", type=Path, help="per-case results (default bench/onnx_suite.json without --filter)")
    parser.add_argument("--known", type=Path, help="known-issues TOML: exit 1 on a wrong result it does not list")
    args = parser.parse_args(argv)
    if not args.filter:
        args.markdown = args.markdown or HERE / "onnx_suite.md"
        args.json = args.json or HERE / "onnx_suite.json"

    t0 = time.monotonic()
    done = []

    def progress(case):
        done.append(case)
        if case.edgec != "pass":
            print(f"[{len(done)}] {case.name}: {case.edgec} {case.edgec_detail}", flush=True)

    results = run_suite(args.filter, args.jobs, args.timeout, progress)
    minutes = (time.monotonic() - t0) / 60
    command = f"python bench/onnx_suite.py --jobs {args.jobs}" + "".join(f" --filter {f}" for f in args.filter)
    header = (f"# ONNX backend node suite through edgec\n\n`{command}` ({len(results)} cases, "
              f"{minutes:.1f} min). {_environment()}.")
    text = markdown(results, header)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"environment": _environment(), "totals": totals(results),
                                         "cases": [asdict(r) for r in results]}, indent=1) + "\n")
    if args.known:
        problems = check_known(results, load_known(args.known))
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
