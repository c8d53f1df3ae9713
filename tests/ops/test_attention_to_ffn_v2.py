"""AttentionToFfn V2 (generation "950"): window contents bit-exact against a loop reference, and the V2 checks."""
import ml_dtypes
import numpy as np
import pytest

from afd import tokens
from afd.comm import Group, LocalWindow
from afd.errors import KernelError
from afd.layout import EXPERT_ID_INIT
from afd.ops import attention_to_ffn, strict_mode
from afd.ops.attention_to_ffn import get_attention_to_ffn_ccl_buffer_size

BF16 = np.dtype(ml_dtypes.bfloat16)
WS, A, M, BS, K, H = 5, 2, 2, 4, 2, 64
MOE = 4  # routed experts 0..3; expert 4 is the one shared expert (E_tab = 5)
K1 = K + 1
REC = 2 + BS * K1  # 14 ints per record
DATA_AT = 512  # align512(A*M*REC*4 = 224)
FFN, ATTN = (0, 1, 2), (3, 4)  # ffn_start_rank_id 0, ffn_num = WS - A = 3
SIZE = 16384
PATTERN = 0x5A
HS = {0: H, 2: H + 128, 3: 512, 4: 512, 5: 512, 6: 512, 7: 512}  # elements (mode 0) or bytes per slot
# Two layers; a row is [rankCnt, (rank, local) x rankCnt], Mtab = 7.
TABLE = np.zeros((2, MOE + 1, 7), np.int32)
TABLE[0] = [[1, 0, 0, 0, 0, 0, 0], [2, 1, 0, 2, 0, 0, 0], [1, 2, 1, 0, 0, 0, 0], [3, 0, 1, 1, 1, 2, 2],
            [1, 0, 5, 0, 0, 0, 0]]
TABLE[1] = [[1, 2, 3, 0, 0, 0, 0], [1, 2, 4, 0, 0, 0, 0], [2, 0, 2, 1, 2, 0, 0], [1, 1, 3, 0, 0, 0, 0],
            [2, 1, 6, 2, 6, 0, 0]]
EXPERTS = np.array([[[0, 1], [3, 2], [1, 1], [2, 0]]], np.int32)


@pytest.fixture
def group(dev):
    windows = {r: LocalWindow(dev, dev.malloc(SIZE).address, SIZE) for r in range(WS)}
    for r, w in windows.items():
        w.bytes[:] = PATTERN
        w.i32(0, A * M * REC).reshape(A, M, REC)[:, :, :2] = 0
        w.i32(0, A * M * REC).reshape(A, M, REC)[:, :, 2:] = EXPERT_ID_INIT
    g = Group("a2f-v2-test", WS, windows)
    g.notified = []
    g._notify = g.notified.append
    return g


def images(group):
    return {r: group.windows[r].bytes.copy() for r in range(WS)}


def make_x(dtype=BF16, seed=0):
    return np.random.default_rng(seed).standard_normal((1, BS, H), dtype=np.float32).astype(dtype)


def send(group, x, session=1, mb=1, layer=0, experts=EXPERTS, table=TABLE, rank=3, quant_mode=0, **kw):
    hs = HS.get(quant_mode, H)
    opts = dict(group=group, world_size=WS, ffn_token_info_table_shape=[A, M, REC],
                ffn_token_data_shape=[A, M, BS, K1, hs], attn_token_info_table_shape=[M, BS, K1],
                moe_expert_num=MOE, rank=rank, quant_mode=quant_mode, generation="950")
    opts.update(kw)
    return attention_to_ffn(x, np.array([session], np.int32), np.array([mb], np.int32),
                            np.array([layer], np.int32), experts, table, **opts)


def reference(before, x, session, mb, layer, experts, table, rank, quant_mode=0, sync_flag=0, mask=None,
              scales=None):
    """The spec's per-call rule, slot by slot, over copies of the windows (independent of the op's code)."""
    out = {r: b.copy() for r, b in before.items()}
    hs = HS[quant_mode]
    stride = hs * (2 if quant_mode == 0 else 1)
    c = BS if mask is None else int(np.count_nonzero(mask))
    got = set()
    record = ((session * M + mb) * REC) * 4
    for t in range(c):
        for k in range(K1):
            e = int(experts[0, t, k]) if k < K else MOE + (k - K)
            row = table[layer, e]
            i = session % row[0]
            to, local = int(row[1 + 2 * i]), int(row[2 + 2 * i])
            got.add(to)
            if quant_mode == 0:
                payload = x[0, t].view(np.uint8)
            else:
                smooth = None if scales is None else scales[layer, e]
                payload = tokens.encode_rows(x[0, t:t + 1], quant_mode, "950", smooth)[0]
            slot = ((session * M + mb) * BS + t) * K1 + k
            at = DATA_AT + slot * stride
            out[to][at:at + payload.size] = payload
            word = record + (2 + t * K1 + k) * 4
            out[to][word:word + 4] = np.array([local], "<i4").view(np.uint8)
    own = out[rank][:M * BS * K1 * 4].view("<i4").reshape(M, BS * K1)
    own[mb, :c * K1] = 0
    targets = [r for r in FFN if r in got] if sync_flag == 1 else list(FFN)
    for r in targets:
        out[r][record:record + 8] = np.array([1, layer], "<i4").view(np.uint8)
    if mask is not None:
        own[mb, c * K1:] = 1
    return out, targets, got


def assert_images(group, want):
    for r in range(WS):
        diff = np.flatnonzero(group.windows[r].bytes != want[r])
        assert diff.size == 0, f"rank {r}: {diff.size} bytes differ, first at {diff[:8].tolist()}"


@pytest.mark.parametrize("session,mb,layer,sync_flag", [(0, 0, 0, 0), (1, 1, 0, 1), (1, 0, 1, 0), (0, 1, 1, 1)])
def test_window_contents_bit_exact(group, session, mb, layer, sync_flag):
    x = make_x(seed=session * 4 + mb + layer)
    before = images(group)
    sent = send(group, x, session, mb, layer, sync_flag=sync_flag)
    want, targets, got = reference(before, x, session, mb, layer, EXPERTS, TABLE, 3, sync_flag=sync_flag)
    assert_images(group, want)
    assert sent["headers"] == targets and sorted(group.notified) == targets
    assert (sent["session"], sent["micro_batch"], sent["layer"]) == (session, mb, layer)
    assert sent["routes"].shape == (BS, K1) and set(np.unique(sent["routes"]).tolist()) == got


def test_replica_is_session_mod_rank_count_with_absolute_ranks(group):
    # expert 3 has three replicas on ranks 0, 1, 2 (locals 1, 1, 2): sessions 0 and 1 pick replicas 0 and 1
    experts = np.full((1, BS, K), 3, np.int32)
    for session, (rank, local) in ((0, (0, 1)), (1, (1, 1))):
        sent = send(group, make_x(), session, 0, 0, experts=experts)
        assert (sent["routes"][:, :K] == rank).all()
        rec = group.windows[rank].i32(0, A * M * REC).reshape(A, M, REC)[session, 0]
        assert rec[2:].reshape(BS, K1)[:, :K].tolist() == [[local] * K] * BS
    # an attention rank is a valid destination on V2: data and words land there, no header (not an FFN rank)
    table = TABLE.copy()
    table[0, 0] = [1, 4, 9, 0, 0, 0, 0]
    experts = np.zeros((1, BS, K), np.int32)
    before = images(group)
    sent = send(group, make_x(), 0, 0, 0, experts=experts, table=table, sync_flag=1)
    want, targets, _ = reference(before, make_x(), 0, 0, 0, experts, table, 3, sync_flag=1)
    assert_images(group, want)
    assert targets == [0] and sent["headers"] == [0]  # the shared expert's rank only
    assert group.windows[4].i32(0, A * M * REC).reshape(A, M, REC)[0, 0, :2].tolist() == [0, 0]


def test_layer_id_picks_its_table_and_must_be_below_l(group):
    sent = send(group, make_x(), 0, 0, 1)
    assert sent["routes"][0].tolist() == [2, 2, 1]  # layer 1: experts 0, 1 on rank 2; shared replica 0 on rank 1
    with pytest.raises(KernelError, match="layer_id: layerId 2 must be less than L 2") as err:
        send(group, make_x(), 0, 0, 2)
    assert err.value.status == 1


def test_active_mask_is_a_count_not_positions(group):
    mask = np.array([[False, True, False, True]])  # two Trues: tokens 0 and 1 go, whatever the positions
    own = group.windows[3].i32(0, M * BS * K1).reshape(M, BS * K1)
    own[:] = 1  # last round's flags: the sent tokens' must be cleared
    x = make_x()
    before = images(group)
    sent = send(group, x, 1, 1, 0, active_mask=mask)
    want, _, _ = reference(before, x, 1, 1, 0, EXPERTS, TABLE, 3, mask=mask[0])
    assert_images(group, want)
    assert sent["routes"].shape == (2, K1)
    assert own[1].tolist() == [0] * (2 * K1) + [1] * (2 * K1) and (own[0] == 1).all()


def test_no_mask_clears_every_own_flag_of_the_micro_batch_and_sets_none(group):
    own = group.windows[4].i32(0, M * BS * K1).reshape(M, BS * K1)
    own[:] = 1
    send(group, make_x(), 0, 1, 0, rank=4)
    assert (own[1] == 0).all() and (own[0] == 1).all()


@pytest.mark.parametrize("quant_mode", [0, 2, 5])
def test_all_masked_sends_nothing_but_headers_and_presets_own_flags(group, quant_mode):
    before = images(group)
    sent = send(group, make_x(), 0, 0, 0, active_mask=np.zeros((1, BS), bool), sync_flag=0, quant_mode=quant_mode)
    want, targets, got = reference(before, make_x(), 0, 0, 0, EXPERTS, TABLE, 3, quant_mode=quant_mode,
                                   mask=np.zeros(BS, bool))
    assert_images(group, want)
    assert got == set() and sent["headers"] == [0, 1, 2] and sent["routes"].shape == (0, K1)
    sent = send(group, make_x(), 1, 0, 0, active_mask=np.zeros((1, BS), bool), sync_flag=1)
    assert sent["headers"] == []


def test_sync_flag_0_headers_every_ffn_rank_even_without_slots(group):
    experts = np.zeros((1, BS, K), np.int32)  # expert 0 and the shared expert: rank 0 only (layer 0)
    send(group, make_x(), 1, 0, 0, experts=experts, sync_flag=0)
    for r in FFN:
        rec = group.windows[r].i32(0, A * M * REC).reshape(A, M, REC)[1, 0]
        assert rec[:2].tolist() == [1, 0]
        assert (rec[2:] == EXPERT_ID_INIT).all() == (r != 0)
    send(group, make_x(), 0, 0, 1, experts=experts, sync_flag=1)  # layer 1: expert 0 -> rank 2, shared -> 1 (s 0)
    heads = [group.windows[r].i32(0, A * M * REC).reshape(A, M, REC)[0, 0, :2].tolist() for r in FFN]
    assert heads == [[0, 0], [1, 1], [1, 1]]


def test_no_backpressure_on_950(group):
    for r in FFN:  # the previous round's headers are still 1: V2 does not wait
        group.windows[r].i32(0, A * M * REC).reshape(A, M, REC)[1, 1, :2] = [1, 7]
    send(group, make_x(), 1, 1, 1, idle=lambda w: pytest.fail("V2 must not wait"))
    assert all(group.windows[r].i32(0, A * M * REC).reshape(A, M, REC)[1, 1, :2].tolist() == [1, 1] for r in FFN)


@pytest.mark.parametrize("dtype", [np.float16, BF16])
@pytest.mark.parametrize("smooth", [False, True])
def test_int8_payload_950_arithmetic(group, dtype, smooth):
    x = make_x(dtype, seed=3)
    x[0, 2] = 0  # an all-zero row: q = 0 (NaN products on hardware, undefined) and scale 1/inf = 0
    scales = (np.random.default_rng(1).uniform(0.5, 2, (2, MOE + 1, H)).astype(np.float32) if smooth else None)
    before = images(group)
    send(group, x, 1, 0, 1, quant_mode=2, scales=scales)
    want, _, _ = reference(before, x, 1, 0, 1, EXPERTS, TABLE, 3, quant_mode=2, scales=scales)
    assert_images(group, want)
    # independent of afd.tokens: f = fp32(x) (* smooth); d = fl(127/max|f|); q = rint(f*d); scale = fl(1/d)
    for t in range(BS):
        for k in range(K1):
            e = int(EXPERTS[0, t, k]) if k < K else MOE
            row = TABLE[1, e]
            to = int(row[1 + 2 * (1 % row[0])])
            at = DATA_AT + ((1 * M + 0) * BS * K1 + t * K1 + k) * HS[2]
            raw = group.windows[to].bytes[at:at + HS[2]]
            f = x[0, t].astype(np.float32) * (scales[1, e] if smooth else np.float32(1))
            if t == 2:
                assert not raw[:H].any() and raw[64:68].view("<f4")[0] == 0
            else:
                d = np.float32(127) / np.abs(f).max()
                assert np.array_equal(raw[:H].view(np.int8), np.rint(f * d).astype(np.int8))
                assert raw[64:68].view("<f4")[0] == np.float32(1) / d  # align32(64) = 64
            assert (raw[68:] == PATTERN).all()  # past the row: left alone (staging leftovers on hardware)


@pytest.mark.parametrize("quant_mode", [3, 4, 5, 6, 7])
def test_mx_payloads(group, quant_mode):
    x = make_x(BF16, seed=quant_mode)
    before = images(group)
    send(group, x, 0, 1, 0, quant_mode=quant_mode)
    want, _, _ = reference(before, x, 0, 1, 0, EXPERTS, TABLE, 3, quant_mode=quant_mode)
    assert_images(group, want)
    payload, scales = tokens.mx_quantize(x[0], quant_mode)
    fmt = tokens.QUANT_MODES[quant_mode].row_format(BF16)
    at = DATA_AT + ((0 * M + 1) * BS * K1 + 3 * K1 + 0) * HS[quant_mode]  # token 3, k 0: expert 2 -> rank 2
    raw = group.windows[2].bytes[at:at + HS[quant_mode]]
    n = fmt.payload_bytes(H)
    assert np.array_equal(raw[:n], payload[3]) and np.array_equal(raw[n:n + 2], scales[3])  # 2 blocks of 32
    assert (raw[n + 2:] == PATTERN).all()


def test_the_compiled_routes_and_numpy_routes_agree(group, dev):
    """A routed id in [moe_expert_num, E_tab) is legal on V2 (the shared expert's row): the compiled pass refuses
    it and the numpy routes take over, writing what the reference writes."""
    experts = np.array([[[4, 0], [1, 4], [2, 3], [0, 0]]], np.int32)
    x = make_x()
    before = images(group)
    send(group, x, 1, 0, 0, experts=experts)
    want, _, _ = reference(before, x, 1, 0, 0, experts, TABLE, 3)
    assert_images(group, want)


def _table(change):
    t = TABLE.copy()
    change(t)
    return t


def _set(t, index, value):
    t[index] = value


@pytest.mark.parametrize("change,field,rule", [
    (dict(quant_mode=1), "quant_mode", "actual 1, expected 0, 2, 3, 4, 5, 6 or 7"),
    (dict(quant_mode=3, scales=np.ones((2, 5, H), np.float32)), "scales", "scales must be absent in MX/MX_CLIP"),
    (dict(scales=np.ones((2, 5, H), np.float32)), "scales and quant_mode",
     "actual isScales=1, quantMode=0, reason: The value of scales must match quant_mode"),
    (dict(sync_flag=2), "sync_flag", "actual 2, expected 0 or 1"),
    (dict(ffn_start_rank_id=5), "ffn_start_rank_id", r"actual 5, expected \[0, 5\)"),
    (dict(ffn_start_rank_id=3), "ffn_start_rank_id", r"expected \[0, 2\] \(ffn_start_rank_id \+ ffn_num must not"),
    (dict(moe_expert_num=0), "moe_expert_num", r"actual 0, expected \(0, 1024\]"),
    (dict(world_size=1025), "world_size", r"actual 1025, expected \[2, 1024\]"),
    (dict(ffn_token_info_table_shape=[3, M, REC]), "ffn_token_info_table_shape",
     "Dim0 of ffn_token_info_table_shape must be equal to dim0 of ffn_token_data_shape"),
    (dict(attn_token_info_table_shape=[M, BS, 4]), "attn_token_info_table_shape",
     "Dim2 of attn_token_info_table_shape must be equal to dim3 of ffn_token_data_shape"),
    (dict(ffn_token_info_table_shape=[5, M, REC], ffn_token_data_shape=[5, M, BS, K1, H]), "ffn_token_data_shape",
     r"actual 5, expected \(0, worldSize=5\)"),
    (dict(moe_expert_num=1), "expert_ids", r"actual 2, expected \(0, min\(16, moe_expert_num=1\)\]"),
    (dict(table=np.zeros((2, 10, 7), np.int32)), "expert_rank_table", r"actual 10, expected \[4, 8\]"),
    (dict(scales=np.ones((1, 5, H), np.float32), quant_mode=2), "scales",
     "Dim0 of scales must be equal to dim0 of expertRankTable"),
    (dict(active_mask=np.ones((1, 3), bool)), "active_mask", "Dim1 of active_mask must be equal to dim1 of x"),
    (dict(ffn_token_data_shape=[A, M, BS, 4, H], attn_token_info_table_shape=[M, BS, 4]), "ffn_token_data_shape",
     r"ffn_token_data_shape\[3\] must be equal to K \+ sharedExpertNum"),
    (dict(ffn_token_info_table_shape=[A, M, REC + 1]), "ffn_token_info_table_shape",
     r"ffn_token_info_table_shape\[2\] is inconsistent with inputs"),
    (dict(quant_mode=2, ffn_token_data_shape=[A, M, BS, K1, H + 127]), r"ffn_token_data_shape\[4\]",
     r"HS \* elemSize \(191 bytes\) must be >= per-token payload 192 bytes"),
    (dict(quant_mode=4, ffn_token_data_shape=[A, M, BS, K1, 257]), r"ffn_token_data_shape\[4\]",
     "must be >= per-token payload 258 bytes"),
    (dict(layer=-1), "layer_id", "layerId 4294967295 must be less than L 2"),
    (dict(experts=np.array([[[0, 5], [0, 0], [0, 0], [0, 0]]], np.int32)), "expert_ids",
     r"expertId 5 must be in \[0, expertNum 5\)"),
    (dict(table=_table(lambda t: _set(t, (0, 1, 0), 0))), "expert_rank_table", "layer 0 expert 1 has rankCnt 0"),
    (dict(table=_table(lambda t: _set(t, (0, 1, 0), 4))), "expert_rank_table",
     "rankCnt 4 exceeds expert_rank_table row capacity M 7"),
    (dict(table=_table(lambda t: _set(t, (0, 0, 1), 5))), "expert_rank_table",
     r"rankId 5 must be in \[0, worldSize 5\)"),
    (dict(session=2), "session_id", r"values must be in \[0, 2\)"),
])
def test_refusals_name_field_and_rule(group, change, field, rule):
    with pytest.raises(KernelError, match=rule) as err:
        send(group, make_x(), **change)
    assert err.value.field == field.replace("\\", "") and err.value.status == 1


def test_int8_needs_two_attention_workers(dev):
    """A = 1 with 1-byte elements leaves a data region too small for the F2A return data (the real tiling's rule):
    align512(1*1*4*3*208) = 2560 < 1*4*3*208*2 = 4992."""
    g = Group("a2f-v2-a1", 2, {r: LocalWindow(dev, dev.malloc(SIZE).address, SIZE) for r in range(2)})
    x = make_x()
    with pytest.raises(KernelError, match="attentionWorkerNum=1 with elemSize=1 leaves a data region of 2560 bytes "
                                          "that cannot host the ffn_to_attention_v2 return data of 4992 bytes"):
        attention_to_ffn(x, np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.int32), EXPERTS,
                         np.ones((1, 5, 3), np.int32), group=g, world_size=2, ffn_token_info_table_shape=[1, 1, REC],
                         ffn_token_data_shape=[1, 1, BS, K1, 2 * H + 80], attn_token_info_table_shape=[1, BS, K1],
                         moe_expert_num=MOE, quant_mode=2, rank=1, generation="950")


def test_strict_limits_only_in_strict_mode(group):
    send(group, make_x())  # H = 64, BS = 4: fine by default
    with strict_mode(), pytest.raises(KernelError, match=r"x: actual 64, expected \[1024, 8192\]"):
        send(group, make_x())


def test_ccl_buffer_size_when_given(group):
    send(group, make_x(), ccl_buffer_size=get_attention_to_ffn_ccl_buffer_size([A, M, REC], [A, M, BS, K1, H], 0))
    with pytest.raises(KernelError, match=r"ccl_buffer_size: actual 1048575, reason: should >= 1048576 bytes "
                                          r"\(token_info \+ token_data\)"):
        send(group, make_x(), ccl_buffer_size=(1 << 20) - 1)


def test_a3_is_unchanged_by_the_generation_keyword(group):
    """The same call on A3 refuses what V2 accepts (a rank outside the FFN ranks) and V1's quant_mode rule."""
    with pytest.raises(KernelError, match="expert_rank_table"):
        send(group, make_x(), table=_table(lambda t: _set(t, (0, 0, 1), 4)), generation="A3")
    send(group, make_x(), table=_table(lambda t: _set(t, (0, 0, 1), 4)))  # 950: rank 4 is a valid destination


def test_ccl_buffer_size_helper_hand_computed():
    # A=2 M=2 F=14 BS=4 E=3 HS=64, mode 0: info 224 -> 512; data 2*2*4*3*64*2 = 6144; staging 12*128 = 1536;
    # flags 13*32 = 416: 8608 -> 2 MiB.
    assert get_attention_to_ffn_ccl_buffer_size([2, 2, 14], [2, 2, 4, 3, 64], 0) == 2 << 20
    # A=1 M=1 F=4610 BS=512 E=9 HS=7168, mode 0: 18944 + 66060288 + 4608*14336 (66060288) + 4609*32 (147488)
    # = 132287008 -> 64 * 2 MiB.
    assert get_attention_to_ffn_ccl_buffer_size([1, 1, 4610], [1, 1, 512, 9, 7168], 0) == 134217728
    # mode 2 (1-byte elements), HS 7680: 18944 + 35389440 + 4608*7680 (35389440) + 147488 = 70945312 -> 34 * 2 MiB
    assert get_attention_to_ffn_ccl_buffer_size([1, 1, 4610], [1, 1, 512, 9, 7680], 2) == 34 * (2 << 20)
    with pytest.raises(RuntimeError, match="^ffn_token_info_table_shape should have 3 elements, but got 2$"):
        get_attention_to_ffn_ccl_buffer_size([1, 2], [1, 1, 1, 1, 1], 0)
    with pytest.raises(RuntimeError, match="^ffn_token_data_shape should have 5 elements, but got 4$"):
        get_attention_to_ffn_ccl_buffer_size([1, 1, 3], [1, 1, 1, 1], 0)
