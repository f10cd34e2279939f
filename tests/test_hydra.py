"""Hydra (the quasiseparable matrix mixer), its SSD scan (``kernels/ssd``) and the ``hydraformer_*`` family.

The chunked scan is checked against the explicit L x L semiseparable matrix (itself checked against the plain
recurrence), the mixer against its explicit quasiseparable matrix built from the decays / B / C / diagonal it computes,
and the block's parameters against the counts of the official ``hydra.modules.hydra.Hydra`` (goombalab/hydra).
"""
import pytest
import timm
import torch

import metaformer_zoo
from metaformer_zoo import zoo
from metaformer_zoo.kernels import ssd as ssd_ops
from metaformer_zoo.kernels.ssd import reference as ref
from metaformer_zoo.mixers import create_mixer, list_mixers
from metaformer_zoo.mixers.hydra import Hydra


def _ssd_inputs(batch=2, L=13, H=4, P=3, G=2, N=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, L, H, P, generator=g, dtype=dtype)
    dt = torch.rand(batch, L, H, generator=g, dtype=dtype) + 0.1
    A = -(torch.rand(H, generator=g, dtype=dtype) + 0.2)
    B = torch.randn(batch, L, G, N, generator=g, dtype=dtype)
    C = torch.randn(batch, L, G, N, generator=g, dtype=dtype)
    return x, dt, A, B, C


def _recurrence(x, dt, A, B, C):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t^T h_t, one step at a time."""
    Bsz, L, H, P = x.shape
    rep = H // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    h = x.new_zeros(Bsz, H, P, B.shape[-1])
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    return torch.stack(ys, 1)


def test_explicit_matrix_is_the_recurrence():
    args = _ssd_inputs()
    torch.testing.assert_close(ref.ssd_explicit(*args), _recurrence(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 64])  # 4, 5 do not divide L = 13
def test_chunked_scan_matches_explicit_matrix(chunk_size):
    args = _ssd_inputs()
    y, final = ref.ssd_chunked(*args, chunk_size=chunk_size)
    torch.testing.assert_close(y, ref.ssd_explicit(*args), rtol=1e-12, atol=1e-12)
    # the final state: running one more step from it equals the scan of the sequence extended by that step
    x, dt, A, B, C = args
    more = [torch.cat([t, t[:, -1:]], 1) for t in (x, dt, B, C)]
    y_more = ref.ssd_explicit(more[0], more[1], A, more[2], more[3])[:, -1]
    h = torch.exp(dt[:, -1] * A)[..., None, None] * final + \
        (dt[:, -1, :, None] * x[:, -1])[..., None] * B[:, -1].repeat_interleave(2, 1)[:, :, None]
    torch.testing.assert_close(torch.einsum("bhpn,bhn->bhp", h, C[:, -1].repeat_interleave(2, 1)), y_more)


def test_chunked_scan_gradients_match_explicit_matrix():
    args = _ssd_inputs(L=11)
    w = torch.randn(2, 11, 4, 3, dtype=torch.float64)
    grads = []
    for fn in (lambda *a: ref.ssd_chunked(*a, chunk_size=4)[0], ref.ssd_explicit):
        leaves = [a.clone().requires_grad_(True) for a in args]
        (fn(*leaves) * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, g_chunk, g_expl in zip("x dt A B C".split(), *grads):
        torch.testing.assert_close(g_chunk, g_expl, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")


def test_ssd_op_dispatch_and_errors():
    args = _ssd_inputs(dtype=torch.float32)
    torch.testing.assert_close(ssd_ops.ssd(*args, chunk_size=4, backend="reference"),
                               ref.ssd_explicit(*args).float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ssd_ops.ssd(*args, backend="cuda")
    x, dt, A, B, C = args
    with pytest.raises(ValueError, match=r"A must be \(heads,\)"):
        ssd_ops.ssd(x, dt, A[:3], B, C)
    with pytest.raises(ValueError, match="multiple of the number of groups"):
        ssd_ops.ssd(x, dt, A, B[:, :, :1].expand(-1, -1, 3, -1), C[:, :, :1].expand(-1, -1, 3, -1))


@pytest.mark.skipif(not __import__("metaformer_zoo.kernels.selective_scan2d", fromlist=["cpu"]).cpu.available(),
                    reason="no C compiler for the CPU scan kernel")
def test_ssd_through_the_selective_scan_cpu_kernel_matches_explicit_matrix():
    """backend="cpu": SSD run as the selective scan (dt repeated per head, A broadcast over N) on the C kernel:
    forward and every gradient against the float64 explicit matrix, grouped B / C, odd L."""
    args = _ssd_inputs(L=11)
    w = torch.randn(2, 11, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (lambda *a: ssd_ops.ssd(*a, backend="cpu"), ref.ssd_explicit):
        leaves = [a.clone().requires_grad_(True) for a in args]
        out = fn(*leaves)
        (out * w).sum().backward()
        grads.append([out.detach()] + [t.grad for t in leaves])
    for name, got, want in zip("y x dt A B C".split(), *grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{name}")
    m = _small_hydra()
    xin = torch.randn(2, 16, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    want = m(xin)
    m.backend = "cpu"
    torch.testing.assert_close(m(xin), want, rtol=1e-10, atol=1e-10)


def _small_hydra(**kwargs) -> Hydra:
    torch.manual_seed(0)
    m = Hydra(16, d_state=4, headdim=8, chunk_size=3, **kwargs).double().eval()
    with torch.no_grad():  # move the constant-initialised parameters off their init
        m.A_log.normal_(0, 0.5)
        m.D.normal_()
        m.dt_bias.normal_(0, 0.5)
        m.norm.weight.normal_(1, 0.2)
    return m


@pytest.mark.parametrize("ngroups", [1, 2])
def test_mixer_is_its_quasiseparable_matrix(ngroups):
    m = _small_hydra(ngroups=ngroups)
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)  # L = 15, chunk 3
    u = x.flatten(2).transpose(1, 2)
    with torch.no_grad():
        z, xs, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag = m.ssm_inputs(u)
        M = ref.hydra_matrix(dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)  # (B, H, L, L)
        y = torch.einsum("bhts,bshp->bthp", M, xs).reshape(2, 15, 32)
        expected = m.out_proj(m.norm(y, z)).transpose(1, 2).reshape(2, 16, 3, 5)
        torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)
    # quasiseparable: every block strictly below (above) the diagonal has rank <= d_state * ngroups' share
    lower = M[0, 0, 8:, :7]
    assert torch.linalg.matrix_rank(lower).item() <= 4 < min(lower.shape)
    assert M[0, 0].diagonal().ne(0).all()


def test_cross_scan_averages_row_and_column_major():
    m = _small_hydra(cross_scan=True)
    x = torch.randn(1, 16, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        row = m.forward_sequence(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(1, 16, 3, 4)
        col = m.forward_sequence(x.transpose(2, 3).flatten(2).transpose(1, 2)).transpose(1, 2)
        col = col.reshape(1, 16, 4, 3).transpose(2, 3)
        torch.testing.assert_close(m(x), (row + col) / 2)
        assert (row - col).abs().max() > 1e-3  # the two routes really differ


# Parameter counts of the official block, measured with goombalab/hydra hydra/modules/hydra.py ``Hydra(**cfg)`` (its
# defaults: d_state=64, d_conv=7, expand=2, headdim=64, ngroups=1, bias=False, conv_bias=True), state dict loaded
# strictly into the zoo module. The zoo module matched the official forward on CPU (mamba-ssm's ssd_minimal_discrete
# standing in for the Triton scan): max |diff| <= 1.8e-06 in float32, <= 3.7e-15 in float64 (see model_cards/hydraformer.md).
OFFICIAL_PARAMS = [
    (dict(d_model=320), 716_958),
    (dict(d_model=512), 1_748_016),
    (dict(d_model=64, d_state=16, headdim=16, ngroups=2), 37_016),
    (dict(d_model=128, d_state=32, headdim=32, d_conv=5, bias=True), 122_152),
]
OFFICIAL_KEYS = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "fc_D.weight",
                 "norm.weight", "out_proj.weight"}


@pytest.mark.parametrize("cfg,params", OFFICIAL_PARAMS)
def test_param_count_and_names_match_official(cfg, params):
    cfg = dict(cfg)
    m = Hydra(cfg.pop("d_model"), **cfg)
    assert sum(p.numel() for p in m.parameters()) == params
    keys = set(m.state_dict())
    assert keys - {"in_proj.bias", "out_proj.bias"} == OFFICIAL_KEYS
    assert ("in_proj.bias" in keys) == cfg.get("bias", False)


def test_mixer_registered_and_errors():
    assert "hydra" in list_mixers()
    assert isinstance(create_mixer("hydra", 64, context=dict(feat_size=(4, 4), proj_drop=0.)), Hydra)
    with pytest.raises(ValueError, match="not a multiple of headdim"):
        Hydra(40)
    with pytest.raises(TypeError, match="unknown kwarg"):
        create_mixer("hydra", 64, d_stat=16)


def test_hydraformer_family():
    fam = zoo.family_of("hydraformer_s12")
    assert fam.variants == ("hydraformer_s12", "hydraformer_s24", "hydraformer_s36")
    names = [f.name for f in zoo.list_families()]
    assert names.index("vim2") < names.index("hydraformer") < names.index("composed")
    assert fam.official is None and not any(v.has_weights for v in fam.models)
    for v in fam.models:  # declared counts are those of the model
        model = timm.create_model(v.name, device="meta")
        assert zoo.count_params(model)[0] == v.params, v.name
        mixers = [type(s.blocks[0].token_mixer).__name__ for s in model.stages]
        assert mixers == ["SepConv", "SepConv", "Hydra", "Hydra"], mixers


def test_hydraformer_s12_forward_backward_features():
    torch.manual_seed(0)
    model = timm.create_model("hydraformer_s12", num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    hydra = model.stages[2].blocks[0].token_mixer
    assert hydra.A_log.grad is not None and hydra.in_proj.weight.grad.abs().sum() > 0
    feats = timm.create_model("hydraformer_s12", features_only=True).eval()
    with torch.no_grad():
        maps = feats(x)
    assert [tuple(f.shape[1:]) for f in maps] == [(64, 16, 16), (128, 8, 8), (320, 4, 4), (512, 2, 2)]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]


assert metaformer_zoo  # imported for its registration side effect
