"""The SiteLink hand-off (mhc_kernels/link.py) in backward calls that run only part of a linked site.

The link hands pre's and post_res's x-gradient terms to the projection's backward. These tests run backward calls in
which one of the site's ops does not run (a gradient of an intermediate output, a retained graph asked twice, an x
that needs no gradient): x's gradient must still be the reference's, and nothing may stay parked in the link."""

import torch

import mhc_kernels as K
from mhc_train.ops.reference import mhc_post_res_ref, mhc_pre_ref, mhc_projection_ref

T, N, C = 4, 3, 5


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, N, C, generator=g).requires_grad_()
    phi = (0.1 * torch.randn(N * C, N * N + 2 * N, generator=g)).requires_grad_()
    base = [torch.rand(T, N, generator=g), torch.rand(T, N, generator=g), torch.rand(T, N, N, generator=g)]
    return x, phi, base


def _site(x, phi, base, link=None, ref=False):
    """A site whose pre and post_res coefficients depend on the projection (as in a model), F = identity."""
    hp, hpo, hr = base
    h = mhc_projection_ref(x, phi, 1e-6) if ref else K.mhc_projection(x, phi, 1e-6, link=link)
    h_pre, h_post = hp * torch.sigmoid(h[:, :N]), hpo * torch.sigmoid(h[:, N : 2 * N])
    h_res = hr * torch.sigmoid(h[:, 2 * N :]).view(-1, N, N)
    if ref:
        f_in = mhc_pre_ref(x, h_pre)
        return f_in, mhc_post_res_ref(x, f_in, h_post, h_res)
    f_in = K.mhc_pre(x, h_pre, link=link)
    return f_in, K.mhc_post_res(x, f_in, h_post, h_res, link=link)


def _ref_dx_of_f_in(x, phi, base, gf):
    xr = x.detach().requires_grad_()
    f_in, _ = _site(xr, phi.detach(), base, ref=True)
    return torch.autograd.grad(f_in, [xr], gf)[0]


def test_gradient_of_the_sub_layer_input_alone():
    """d f_in / d x: post_res joined the link but does not run in this backward; its term is zero, not an error."""
    x, phi, base = _inputs()
    f_in, _ = _site(x, phi, base, link=K.SiteLink())
    gf = torch.randn_like(f_in)
    (dx,) = torch.autograd.grad(f_in, [x], gf)
    torch.testing.assert_close(dx, _ref_dx_of_f_in(x, phi, base, gf), rtol=1e-4, atol=1e-5)


def test_a_term_handed_over_in_an_earlier_backward_is_not_reused():
    """retain_graph: a first call that needs no dx (phi only) leaves pre's and post_res's terms in the link; a second
    call in which post_res does not run must not add the first call's H_res^T g to dx (today it does, silently)."""
    x, phi, base = _inputs()
    f_in, out = _site(x, phi, base, link=K.SiteLink())
    torch.autograd.grad(out, [phi], torch.randn_like(out), retain_graph=True)
    gf = torch.randn_like(f_in)
    (dx,) = torch.autograd.grad(f_in, [x], gf)
    torch.testing.assert_close(dx, _ref_dx_of_f_in(x, phi, base, gf), rtol=1e-4, atol=1e-5)


def test_nothing_stays_in_the_link_when_x_needs_no_gradient():
    """x without grad (phi with): pre and post_res still hand over g (T x n x C) and dF_in, nobody takes them, and the
    link keeps them alive for as long as the graph lives."""
    x, phi, base = _inputs()
    link = K.SiteLink()
    _, out = _site(x.detach(), phi, base, link=link)
    out.backward(torch.randn_like(out))
    assert not link._given, {op: [tuple(t.shape) for t in ts] for op, ts in link._given.items()}


def test_full_recompute_under_a_split_backward_leaks_no_link():
    """recompute=full with ZBV / DualPipeV on the kernels: the weight call of `_FullRecompute.backward` re-runs the group
    with an x that needs no gradient, so the group's first site hands over terms nobody takes; h_pre / h_res carry
    their grad_fn, so link -> h_res -> graph -> projection ctx -> link is a cycle the GC cannot free (autograd nodes
    are not traversed): one [T, n, C] + [T, C] leaked per group, micro-batch and step."""
    import gc

    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    from mhc_train.config import ConnectionConfig
    from mhc_train.model.connections import MHCSite
    from mhc_train.model.transformer import SitePart
    from mhc_train.parallel.recompute import _FullRecompute, _part_params

    torch.manual_seed(0)
    site = MHCSite(C, N, 1, ConnectionConfig(type="mhc", n_streams=N, backend="triton"))
    with torch.no_grad():
        for p in site.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    owner = torch.nn.Linear(C, C, bias=False)
    parts = [SitePart(site, torch.nn.Identity(), owner, owner)]
    params = [p for part in parts for p in _part_params(part)]

    def live():
        gc.collect()
        return sum(isinstance(o, K.SiteLink) for o in gc.get_objects())

    before = live()
    for _ in range(2):
        x = torch.randn(2, T, N, C).requires_grad_()
        out = _FullRecompute.apply(x.view_as(x), parts, len(params), *(p.view_as(p) for p in params)).clone()
        _, groups = stage_backward_input([out], [torch.randn_like(out)], [x], iter(params))
        stage_backward_weight(iter(params), groups)
        del out, groups, x
    assert live() == before
