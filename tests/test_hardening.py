"""Hostile pickles: each class of issue 9 (shared stand-ins, hash and memo bombs, allocation bombs, stride-0 views,
code through every opcode) built by the test, in zip and legacy form, read without running anything."""

from __future__ import annotations

import io
import json
import pickle
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES, bn_state

from bncli.errors import InputError
from bncli.loading import load_checkpoint

MARKER_CODE = "open({!r}, 'w').write('ran')"


def zip_with_pickle(path: Path, pkl: bytes) -> Path:
    """A real torch.save archive whose data.pkl is replaced by `pkl` (its storage records kept)."""
    buf = io.BytesIO()
    torch.save(bn_state(4), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else zin.read(info))
    return path


def legacy_with_pickle(path: Path, pkl: bytes) -> Path:
    """A legacy torch file whose object pickle is `pkl` (no storages)."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001}))
    path.write_bytes(head + pkl + pickle.dumps([], protocol=2))
    return path


BUILDERS = {"zip": zip_with_pickle, "legacy": legacy_with_pickle}


def memo_dag(levels: int) -> bytes:
    """t0 = (); t(k+1) = (t(k), t(k)): 2**levels leaves by reference, 9 bytes a level."""
    out = b")q\x00"
    for k in range(1, levels + 1):
        out += b"h" + bytes([k - 1]) + b"h" + bytes([k - 1]) + b"\x86q" + bytes([k])
    return out


def _inspect_json(cli, *paths) -> dict:
    result = cli("inspect", *paths, "--format", "json")
    return {"code": result.exit_code, **json.loads(result.stdout)}


# --------------------------------------------------------------------------- BUILD on what the pickle did not make

BUILD_ON_GLOBALS = {
    # the storage type every tensor of every load refers to: would make float32 data read as bfloat16
    "storage-type": b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x08\x00\x00\x00bfloat16sb.",
    # a standard-library class
    "stdlib-class": b"\x80\x02ccollections\nOrderedDict\n}X\x07\x00\x00\x00__doc__K\x01sb.",
    # a stand-in function's defaults
    "stand-in-function": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x0c\x00\x00\x00__defaults__)sb.",
    # a tensor the pickle rebuilt: torch allows BUILD only on OrderedDict's _metadata
    "ordered-dict-other-state": b"\x80\x02ccollections\nOrderedDict\n)R}X\x03\x00\x00\x00fooK\x01sb.",
}


@pytest.mark.parametrize("form", sorted(BUILDERS))
@pytest.mark.parametrize("case", sorted(BUILD_ON_GLOBALS))
def test_build_on_objects_the_pickle_did_not_make_is_refused(tmp_path, case, form):
    path = BUILDERS[form](tmp_path / "build.pt", BUILD_ON_GLOBALS[case])
    with pytest.raises(InputError, match="BUILD on a "):
        load_checkpoint(path)


def test_a_hostile_neighbour_changes_no_verdict(tmp_path, cli):
    """inspect dir/ gives every file the report it gets alone, whatever the files before it tried."""
    folder = tmp_path / "dir"
    folder.mkdir()
    for i, case in enumerate(sorted(BUILD_ON_GLOBALS)):
        zip_with_pickle(folder / f"{i}_hostile.pt", BUILD_ON_GLOBALS[case])
    (folder / "5_defects.pt").write_bytes((SAMPLES / "model_defects.pt").read_bytes())
    (folder / "6_clean.pt").write_bytes((SAMPLES / "model.pt").read_bytes())
    together = _inspect_json(cli, folder)["files"]
    for report in together:
        alone = _inspect_json(cli, report["path"])["files"]
        assert alone == [report], report["path"]
    assert [f["rule"] for f in together[-2]["findings"]]  # the defects are still found after the hostile files


def test_ordered_dict_metadata_is_accepted(tmp_path):
    """torch itself sets _metadata on a state dict's OrderedDict: the one BUILD on a non-record that is allowed."""
    path = tmp_path / "meta.pt"
    sd = torch.nn.BatchNorm2d(3).state_dict()
    assert hasattr(sd, "_metadata")
    torch.save(sd, path)
    assert list(load_checkpoint(path)) == list(sd)


# --------------------------------------------------------------------------- bombs: bounded work, bounded memory


def _run_bounded(path: Path) -> tuple[int, str, int]:
    """inspect in a child process: exit code, stderr, peak memory in KB (a hang fails through the timeout)."""
    code = (
        "import resource, sys\n"
        "from bncli.cli import main\n"
        "sys.argv = ['bncli', 'inspect', sys.argv[1]]\n"
        "try:\n    main()\n"
        "except SystemExit as e:\n    code = e.code\n"
        # VmHWM belongs to this process's own address space (ru_maxrss would carry the forking parent's peak)
        "peak = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
        "print(peak[0] if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    *lines, peak = done.stderr.strip().splitlines()
    return done.returncode, "\n".join(lines), int(peak)


@pytest.mark.parametrize("form", sorted(BUILDERS))
@pytest.mark.parametrize(
    "case, pkl, message",
    [
        ("hash-bomb", b"\x80\x02" + memo_dag(64) + b"}q\x41h\x40K\x01s.", "memo bomb"),
        ("set-bomb", b"\x80\x02" + memo_dag(64) + b"\x8f(h\x40\x90.", "memo bomb"),
        ("dag-value", b"\x80\x02" + memo_dag(64) + b".", "memo bomb"),
        ("nested-key", b"\x80\x02}((K\x01\x85\x85\x85K\x02s.", "only flat values are hashed"),
        ("allocations", b"\x80\x02](" + b"c__builtin__\nbytearray\nJ\x00\x00\x10\x00\x85R" * 1500 + b"e.", "allocate"),
        ("one-big-allocation", b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x60\x85R.", "allocate"),
        ("bytes-from-size", b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x60\x85R.", "allocate"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 24 else "",
)
def test_bombs_are_refused_before_the_work(tmp_path, case, pkl, message, form):
    path = BUILDERS[form](tmp_path / f"{case}.pt", pkl)
    code, stderr, peak_kb = _run_bounded(path)
    assert code == 3, stderr
    assert message in stderr and stderr.startswith("error: ")
    assert peak_kb < 400_000  # far below what the pickle asks for (up to 1.5 GB, or forever)


def test_stride_zero_view_counts_at_full_size(tmp_path, cli):
    """running_var declared as 10**8 elements over a 4-byte storage: refused, not materialized (3.9 GB)."""
    sd = bn_state(4)
    sd["bn.running_var"] = torch.ones(1).expand(10**8)
    sd["bn.running_mean"] = torch.zeros(1).expand(10**8)
    path = tmp_path / "stride0.pt"
    torch.save(sd, path)
    assert path.stat().st_size < 4000
    code, stderr, peak_kb = _run_bounded(path)
    assert code == 3 and "repeats the bytes of its storage" in stderr, stderr
    assert peak_kb < 400_000


def test_small_stride_zero_view_reads_as_torch_does(tmp_path):
    sd = bn_state(4)
    sd["bn.running_var"] = torch.full((1,), 2.5).expand(4)
    path = tmp_path / "s.pt"
    torch.save(sd, path)
    ckpt = load_checkpoint(path)
    assert ckpt.read("bn.running_var").tolist() == torch.load(path, weights_only=True)["bn.running_var"].tolist()


# --------------------------------------------------------------------------- code through every opcode stays a record

POSIX = "posix" if sys.platform != "win32" else "nt"


def _calls(marker: Path) -> dict[str, bytes]:
    cmd = f"touch {marker}".encode()
    arg = b"X" + len(cmd).to_bytes(4, "little") + cmd
    sd = b"}X\x01\x00\x00\x00a"  # {"a": <call>}
    return {
        "GLOBAL+REDUCE": b"\x80\x02" + sd + b"c" + POSIX.encode() + b"\nsystem\n" + arg + b"\x85Rs.",
        "STACK_GLOBAL": b"\x80\x04" + sd + b"\x8c" + bytes([len(POSIX)]) + POSIX.encode() + b"\x8c\x06system\x93" + arg
        + b"\x85Rs.",
        "INST": b"\x80\x02" + sd + b"(" + arg + b"i" + POSIX.encode() + b"\nsystem\ns.",
        "OBJ": b"\x80\x02" + sd + b"(c" + POSIX.encode() + b"\nsystem\n" + arg + b"os.",
    }


@pytest.mark.parametrize("form", sorted(BUILDERS))
@pytest.mark.parametrize("opcode", sorted(_calls(Path("x"))))
def test_code_through_any_opcode_is_a_record_and_named(tmp_path, opcode, form):
    from bncli.formats.pickle_vm import Instance
    from bncli.loading import _pickled_code, read_torch, sniff

    marker = tmp_path / "MARKER"
    pkl = _calls(marker)[opcode]
    # the pickle really would run the command (checked in a child process, with another marker path)
    probe = tmp_path / "PROBES"  # as long as MARKER: the pickle spells the length of the command
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=pkl.replace(str(marker).encode(), str(probe).encode()), check=True, timeout=30)
    assert probe.exists()
    path = BUILDERS[form](tmp_path / "evil.pt", pkl)
    obj, machine = read_torch(path, sniff(path))
    assert not marker.exists()
    assert isinstance(obj["a"], Instance) and obj["a"].class_path == f"{POSIX}.system"
    assert _pickled_code(machine) == {"pickled_globals": (f"{POSIX}.system",), "pickled_calls": (f"{POSIX}.system",)}


def test_getattr_payload_stays_a_record(tmp_path):
    """builtins.getattr(builtins.object, 'eval') then a call: each step a record, nothing resolved or called."""
    from bncli.formats.pickle_vm import Instance
    from bncli.loading import read_torch

    pkl = (b"\x80\x02}X\x01\x00\x00\x00ac__builtin__\ngetattr\nc__builtin__\nobject\nX\x04\x00\x00\x00eval\x86R"
           b"X\x05\x00\x00\x001 + 1\x85Rs.")
    obj, machine = read_torch(zip_with_pickle(tmp_path / "g.pt", pkl), "torch-zip")
    call = obj["a"]
    assert isinstance(call, Instance) and isinstance(call.func, Instance)
    assert call.func.func.path == "builtins.getattr" and call.args == ("1 + 1",)
    assert sorted(machine.calls) == ["builtins.getattr"]


def test_peak_memory_of_a_normal_load_is_modest(tmp_path):
    """The machine's bookkeeping is proportionate: the sample checkpoint loads in a few MB more than nothing."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(20):
        ckpt = load_checkpoint(SAMPLES / "model.pt")
        [ckpt.read(k) for k in ckpt]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000


@pytest.mark.parametrize("uses, code", [(1000, 0), (20000, 3)])
def test_reused_tuple_keys_are_charged_what_hashing_them_costs(tmp_path, uses, code):
    """A 64x64 tuple key reused from the memo: checked once, then each use charged its 4,160 items; 1,000 uses
    read, 20,000 (83 M items hashed from 120 KB) refused by the opcode budget, quickly either way."""
    inner = b"(" + b"N" * 64 + b"tr\x00\x00\x01\x000"
    outer = b"(" + b"j\x00\x00\x01\x00" * 64 + b"tr\x01\x00\x01\x00"
    flood = inner + outer + b"0" + b"}j\x01\x00\x01\x00Ns0" * uses
    buf = io.BytesIO()
    torch.save(bn_state(4), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    path = zip_with_pickle(tmp_path / "flood.pt", pkl[:2] + flood + pkl[2:])
    got, stderr, _ = _run_bounded(path)  # the subprocess timeout (60 s) is the hang detector
    assert got == code, stderr
    if code:
        assert "opcodes; refused" in stderr


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_integers_too_long_to_print_are_input_errors(tmp_path, cli, legacy):
    """num_batches_tracked = 10**5000 (torch.load reads it): one error line, exit 3, in every format and command."""
    sd = bn_state(4)
    sd["bn.num_batches_tracked"] = 10**5000
    path = tmp_path / "big.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    for args in (("inspect", path), ("inspect", path, "--format", "json"), ("inspect", path, "--layer", "bn"),
                 ("diff", path, path)):
        result = cli(*args)
        assert result.exit_code == 3, (args, result)
        assert "beyond int64" in result.stderr and result.stderr.count("\n") == 1, result
