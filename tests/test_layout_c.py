"""afd.layout against the origin document's #pragma pack(1) ScheduleContext, built with the system compiler."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from afd.layout import AREAS, CONTEXT_SIZE, SCHEDULE_CONTEXT_DTYPE, ScheduleContext, field_offsets

ORIGIN = Path("/work/shared/spec/000_0e2cc3552cf0126e.txt")

# Verbatim from the origin document's sample program (the part between pack(push, 1) and pack(pop)).
STRUCT_SOURCE = r"""#pragma pack(push, 1)
struct AttentionDataDesc {
int32_t flag[0];
};
struct ScheduleContext {
struct CommonArea {
uint32_t session_num; // Number of attention nodes
uint32_t micro_batch_num;
uint32_t micro_batch_size;
uint32_t selected_expert_num;
uint32_t expert_num; // Number of experts per layer, including routing experts and shared experts.
uint32_t attn_to_ffn_token_size; // Each token in the Ffn window data area has a space size aligned to 512 bytes.
uint32_t ffn_to_attn_token_size; // Each token in the Attention window data area has a space size aligned to 512 bytes.
int32_t schedule_mode; // 0: Ffn only 1: Attention only
int8_t reserve0[96];
};
struct ControlArea {
int32_t run_flag; // 0 : exited 1 : running
int8_t reserve2[124];
};
struct FfnArea {
// ffn area
uint64_t token_info_buf; // Points to device memory.
uint64_t token_info_buf_size;
uint64_t token_data_buf; // Points to device memory.
uint64_t token_data_buf_size;
uint64_t polling_index; // For synchronous computation only:records the micro-batch ids to be processed internally by the ffn worker scheduler.
int8_t reserve3[88];
// ffn out area
uint64_t layer_ids_buf; // Points to a device memory region that stores the organized layer ids, with an array size of session_num.
uint64_t layer_ids_buf_size; // Total size: session_num * sizeof(int32_t)
uint64_t session_ids_buf; // Points to a device memory region that stores the organized session ids. The array size is session_num.
uint64_t session_ids_buf_size; // Total size: session_num * sizeof(int32_t)
uint64_t micro_batch_ids_buf; // Points to a device memory region that stores the organized micro batch ids. The array size is session_num.
uint64_t micro_batch_ids_buf_size; // Total size: session_num * sizeof(int32_t)
uint64_t expert_ids_buf; // Points to a device memory region that stores the organized expert ids. The tensor dimensions are [session_num, batch_size, selected_expert_num].
uint64_t expert_ids_buf_size; // Total memory size: session_num * batch_size * selected_expert_num * sizeof(int32_t)
uint32_t out_num; // Indicates the number of sessions that have been processed.
int8_t reserve4[60];
};
struct AttentionArea {
// attention area
uint64_t token_info_buf; // Points to device memory.
uint64_t token_info_buf_size;
uint64_t token_data_buf; // Points to device memory.
uint64_t token_data_buf_size;
uint32_t micro_batch_id; // Records the latest ready micro batch id.
int8_t reserve5[92];
};
// common area
CommonArea common;
ControlArea control;
AttentionArea attention;
FfnArea ffn;
// reserve area
int8_t reserve6[384]; // Padding to 1024 bytes.
};
static_assert(sizeof(ScheduleContext) == 1024, "ScheduleContext size must be 1024 bytes");
#pragma pack(pop)
"""


def _fields(include_reserved: bool = False) -> list[tuple[str, np.dtype, int]]:
    """(area.name, dtype, absolute offset) of every field of afd.layout, in offset order."""
    out = []
    for area in AREAS:
        sub, base = SCHEDULE_CONTEXT_DTYPE.fields[area]
        for name, (dt, off) in sub.fields.items():
            if include_reserved or not name.startswith("reserve"):
                out.append((f"{area}.{name}", dt, base + off))
    return sorted(out, key=lambda f: f[2])


# A distinct value per field, in range for its type; signed fields get negative values to catch sign mix-ups.
def _distinct_values() -> dict[str, int]:
    values = {}
    for i, (name, dt, _) in enumerate(_fields()):
        if dt.kind == "i":
            values[name] = -(1000 + i)
        elif dt.itemsize == 8:
            values[name] = 0x9100_0000_0000_0000 + (i << 20) + i
        else:
            values[name] = 0x8000_0000 + 7 * i
    return values


_CTYPE = {("u", 4): ("unsigned", "%u"), ("i", 4): ("int", "%d"), ("u", 8): ("unsigned long long", "%llu")}


def _program() -> str:
    lines = ["#include <cstdio>", "#include <cstdint>", "#include <cstddef>", "#include <cstring>",
             "#include <cstdlib>", STRUCT_SOURCE,
             "int main(int argc, char** argv) {",
             "  if (argc < 2) return 64;",
             "  if (!strcmp(argv[1], \"offsets\")) {",
             "    printf(\"sizeof %zu\\n\", sizeof(ScheduleContext));"]
    for area in AREAS:
        lines.append(f'    printf("sizeof.{area} %zu\\n", sizeof(((ScheduleContext*)0)->{area}));')
    for name, _, _ in _fields(include_reserved=True):
        lines.append(f'    printf("{name} %zu %zu\\n", offsetof(ScheduleContext, {name}), '
                     f'sizeof(((ScheduleContext*)0)->{name}));')
    lines.append('    printf("reserve6 %zu %zu\\n", offsetof(ScheduleContext, reserve6), '
                 'sizeof(((ScheduleContext*)0)->reserve6));')
    lines += ["    return 0;", "  }",
              "  ScheduleContext ctx;",
              "  if (!strcmp(argv[1], \"fill\")) {",
              "    memset(&ctx, 0xA5, sizeof ctx);  // reserves keep this pattern"]
    for name, value in _distinct_values().items():
        lines.append(f"    ctx.{name} = {value}{'LL' if value < 0 else 'ULL'};")
    lines += ["    FILE* f = fopen(argv[2], \"wb\");",
              "    if (!f || fwrite(&ctx, 1, sizeof ctx, f) != sizeof ctx) return 2;",
              "    return fclose(f) ? 3 : 0;", "  }",
              "  if (!strcmp(argv[1], \"read\")) {",
              "    FILE* f = fopen(argv[2], \"rb\");",
              "    if (!f || fread(&ctx, 1, sizeof ctx, f) != sizeof ctx) return 4;",
              "    fclose(f);"]
    for name, dt, _ in _fields():
        ctype, fmt = _CTYPE[(dt.kind, dt.itemsize)]
        lines.append(f'    printf("{name} {fmt}\\n", ({ctype})ctx.{name});')
    lines += ["    return 0;", "  }", "  return 64;", "}"]
    return "\n".join(lines) + "\n"


def _compilers() -> list[list[str]]:
    """C++ drivers first (the struct is C++: `CommonArea common;`), then the C drivers compiling as C++."""
    out = [[c] for c in ("c++", "g++", "clang++") if shutil.which(c)]
    out += [[c, "-x", "c++"] for c in ("cc", "gcc", "clang") if shutil.which(c)]
    return out


@pytest.fixture(scope="module")
def layout_program(tmp_path_factory) -> Path:
    drivers = _compilers()
    if not drivers:
        pytest.skip("no system compiler (c++/g++/cc/gcc/clang) on PATH to build the origin document's struct")
    tmp = tmp_path_factory.mktemp("layout_c")
    src = tmp / "schedule_context.cc"
    src.write_text(_program())
    exe = tmp / "schedule_context"
    errors = []
    for driver in drivers:
        proc = subprocess.run([*driver, "-std=c++11", "-O0", "-o", str(exe), str(src)], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode == 0:
            yield exe
            shutil.rmtree(tmp, ignore_errors=True)
            return
        errors.append(f"{' '.join(driver)}: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    shutil.rmtree(tmp, ignore_errors=True)
    # A driver exists but none builds C++ (e.g. cc without cc1plus): that is an environment gap, not a layout bug.
    if all("cc1plus" in e or "not found" in e for e in errors):
        pytest.skip(f"the system compiler cannot build C++ (the struct needs it): {errors}")
    pytest.fail(f"the origin document's struct does not compile: {errors}")


def _run(exe: Path, *args: str) -> str:
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{exe.name} {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


def test_embedded_struct_is_the_origin_documents():
    if not ORIGIN.exists():
        pytest.skip(f"origin document not present at {ORIGIN}")
    text = ORIGIN.read_text(encoding="utf-8")
    start = text.index("#pragma pack(push, 1)")
    end = text.index("#pragma pack(pop)", start) + len("#pragma pack(pop)")
    assert STRUCT_SOURCE.strip() == text[start:end].strip()


@pytest.mark.timeout(180)
def test_offsets_and_sizes_match_the_c_struct(layout_program):
    c = {}
    for line in _run(layout_program, "offsets").splitlines():
        name, *nums = line.split()
        c[name] = tuple(int(n) for n in nums)
    assert c["sizeof"] == (CONTEXT_SIZE,) and SCHEDULE_CONTEXT_DTYPE.itemsize == CONTEXT_SIZE
    for area in AREAS:
        assert c[f"sizeof.{area}"] == (SCHEDULE_CONTEXT_DTYPE.fields[area][0].itemsize,), area
    for name, dt, off in _fields(include_reserved=True):
        assert c[name] == (off, dt.itemsize), f"{name}: C (offset, size) {c[name]} != afd.layout {(off, dt.itemsize)}"
    assert c["reserve6"] == (SCHEDULE_CONTEXT_DTYPE.fields["reserve6"][1], 384)
    for name, off in field_offsets().items():
        assert c[name][0] == off, name
    # The fields tile the struct with no gap, so a field missing from afd.layout cannot hide.
    spans = sorted(v for k, v in c.items() if not k.startswith("sizeof"))
    pos = 0
    for off, size in spans:
        assert off == pos, f"gap or overlap at byte {pos}"
        pos += size
    assert pos == CONTEXT_SIZE


@pytest.mark.timeout(180)
def test_c_written_context_decodes_field_by_field(layout_program, tmp_path):
    dump = tmp_path / "from_c.bin"
    _run(layout_program, "fill", str(dump))
    data = dump.read_bytes()
    assert len(data) == CONTEXT_SIZE
    ctx = ScheduleContext.from_bytes(data)
    expected = _distinct_values()
    for name, value in expected.items():
        area, field = name.split(".")
        assert getattr(getattr(ctx, area), field) == value, name
    flat = {f"{a}.{k}": v for a, fields in ctx.as_dict().items() for k, v in fields.items()}
    assert flat == expected
    reserve_bytes = [(off, dt.itemsize) for name, dt, off in _fields(include_reserved=True) if ".reserve" in name]
    reserve_bytes.append((640, 384))
    for off, size in reserve_bytes:
        assert data[off:off + size] == b"\xa5" * size, f"reserve at {off} was touched"
    assert ctx.to_bytes() == data


@pytest.mark.timeout(180)
def test_python_encoded_context_reads_back_in_c(layout_program, tmp_path):
    expected = _distinct_values()
    ctx = ScheduleContext()
    ctx.set_fields(expected)
    dump = tmp_path / "from_py.bin"
    dump.write_bytes(ctx.to_bytes())
    printed = {}
    for line in _run(layout_program, "read", str(dump)).splitlines():
        name, value = line.split()
        printed[name] = int(value)
    assert printed == expected
