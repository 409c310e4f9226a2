"""Single-pass ("lagged") mHC, DeepSeek-V4.1's connection (`connection.type: mhc_single_pass`; docs/mhc.md section 10).

Axis legend: B batch, T time, n streams, C channels.

Semantics (per token; site l = 0 .. L-1, two per block):
    (p_l', post_l, H_res_l) = coefficients(x_l)          # mHC's map of x_l (connection.numerics: paper | deepseek_v4)
    x_{l+1} = H_res_l x_l + post_l^T F_l(m_l . x_l)      # read with the mix m_l the PREVIOUS site computed
    m_{l+1} = p_l'                                       # this site's read mix is the next site's
with m_0 = e_0 (the first sub-layer reads stream 0) and the output collapse `m_L . x_L` (the last FFN site's mix; no
head weights). A site's read mix is thus known before the site runs, so F's input needs no projection of x_l first.

Notable choices:
- The lagged mix travels inside the stream state: the model's state is [B, T, n + 1, C], rows 0..n-1 the streams and
  row n the mix (its first n channels; zeros after). The block calls its sites and the transformer its connection
  exactly as for the other arms (no branch on the type), and everything that moves the state (pipeline boundaries,
  decode's per-token state, saved activations) moves the mix with it: `Connection.n_streams` is n + 1 here, the
  state's row count; the sites' stream count stays `connection.n_streams`. Cost: C elements per token instead of n;
  bf16 streams would round the carried mix (refused).
- On the torch backend the ops are the other arms' (`SiteStep`), unlinked: each op writes its own dx (the read mix
  is not the projection's, so the one-dx chaining of `library.Link` does not apply). On triton (n <= 16) the arm's
  own fused ops run (`ops/single_pass.py`): one pass over the packed state reads F's input with the carried mix and
  projects x_l; one pass writes x_{l+1} with the next mix packed; backward kernels chained to one state gradient.
- Cross-site fusion (triton): the connection tells each site its successor (`chain_sites`, once, from the model's
  forward order); `SinglePassStep.run` has a site's write compute the next site's read in the same kernel
  (`mhc_kernels/single_pass_fused.py`) and hands it over (`ops.single_pass.Prefetch`), taken only for the very state
  tensor it was computed from. Where the next site cannot be served (another rank's or a sharded phi, compile, the
  halves of selective recomputation, a full-recomputation group's last site: `parallel/recompute.py` chains within
  groups) the unfused pair runs, with the same bits.
- The packing lives in the arm's step (`SinglePassStep`), so selective recomputation, which replays sites through
  `site.read` / `site.step.write`, and full recomputation, which reruns them, run this arm unchanged. Refused at config time: bf16 streams and
  `connection.collapse` (the arm's collapse is its mix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mhc_train import ops
from mhc_train.config import ConnectionConfig
from mhc_train.model.connections import CONNECTIONS, Collapse, Connection, MHCSite
from mhc_train.ops.single_pass import Prefetch, SinglePassKernels, single_pass_write


class SinglePassRead(ops.SiteRead):
    """A single-pass site's read half for its write: mixing coefficients, kernels and the next site's read mix."""

    __slots__ = ("mix",)

    def __init__(self, h_post, h_res, kernels, mix):
        super().__init__(h_post, h_res, kernels)
        self.mix = mix


def split_state(state: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, n+1, C] -> (streams [B, T, n, C], the carried read mix [B, T, n])."""
    return state[..., :n, :], state[..., n, :n]


def pack_state(x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """(streams [B, T, n, C], mix [B, T, n]) -> [B, T, n+1, C], the mix in row n's first n channels."""
    row = F.pad(mix.to(x.dtype), (0, x.shape[-1] - mix.shape[-1])).unsqueeze(-2)  # [B, T, 1, C]
    return torch.cat([x, row], dim=-2)


class SinglePassStep(ops.SiteStep):
    """The connection's site step for the packed state: `read` splits off the carried mix and reads x_l with it,
    `write` merges and packs this site's H_pre as the next mix. Every caller of a step (the site, selective
    recomputation's replays, DualPipeV's runner) thus handles the single-pass state without knowing the arm."""

    def __init__(self, backend, n: int):
        super().__init__(backend)
        self.n = n

    def fused(self, state: torch.Tensor) -> bool:
        """Whether this call runs the arm's fused kernels (ops/single_pass.py): the triton backend within its limits."""
        from mhc_kernels.utils import MAX_STREAMS

        return self.backend(state.device).name == "triton" and self.n <= MAX_STREAMS

    def read(self, coefficients, state, linked: bool = True, pre: bool = True, fetched=None):
        """`fetched`: this site's read as the previous site's fused write computed it (`Prefetch.take`), or None."""
        x, mix = split_state(state, self.n)  # [B, T, n, C], [B, T, n]
        if self.fused(state):  # one pass over x_l: F's input with the carried mix, and the projection
            kernels = SinglePassKernels(self.backend(state.device), state, fetched)
            h_pre, h_post, h_res = self.coefficients(coefficients, x, kernels)
            return (kernels.f_in if pre else None), SinglePassRead(h_post, h_res, kernels, h_pre)
        kernels = self.kernels(x, linked=False)  # unlinked: the read mix is not this projection's (module docstring)
        h_pre, h_post, h_res = self.coefficients(coefficients, x, kernels)  # from x_l
        f_in = kernels.pre(x, mix) if pre else None  # [B, T, C]: the previous site's mix reads x_l
        return f_in, SinglePassRead(h_post, h_res, kernels, h_pre)

    def write(self, state, y, read: SinglePassRead, runner=None, ahead: Prefetch | None = None) -> torch.Tensor:
        """`ahead`: the next site's `Prefetch` (fused path only): the same pass computes that site's read."""
        if isinstance(read.kernels, SinglePassKernels):  # one pass: x_{l+1} and the packed next mix
            args = (state.contiguous(), y, read.h_post, read.h_res, read.mix, read.kernels.link, ahead)
            return single_pass_write(*args) if runner is None else runner(single_pass_write, *args)
        args = (state[..., : self.n, :], y, read.h_post, read.h_res)
        out = read.kernels.post_res(*args) if runner is None else runner(read.kernels.post_res, *args)
        return pack_state(out, read.mix)  # [B, T, n+1, C]

    def run(self, site: SinglePassSite, state, sublayer, runner=None) -> torch.Tensor:
        """The whole site as the plain model runs it, fused across the boundary where it can be: its read is taken
        from the previous site's write when that computed it from `state` itself, and its write computes the next
        site's read when `site.next_site` is one this call can serve (`_ahead`). Same bits as read + write apart."""
        if torch.compiler.is_compiling():  # no Python hand-over between sites inside a graph
            out, _ = self(site._coefficients, state, sublayer, runner)
            return out
        fetched, site.fetched = (site.fetched.take(state) if site.fetched is not None else None), None
        f_in, read = self.read(site._coefficients, state, fetched=fetched)
        y = sublayer(f_in)
        ahead = self._ahead(site, state) if isinstance(read.kernels, SinglePassKernels) else None
        out = self.write(state, y, read, runner, ahead)
        if ahead is not None:
            if runner is not None and out.is_cuda:  # made on DualPipeV's priority stream: used on this one (as `out`)
                for t in ahead.values:
                    t.record_stream(torch.cuda.current_stream())
            site.next_site.fetched = ahead
        return out

    @staticmethod
    def _ahead(site: SinglePassSite, state: torch.Tensor) -> Prefetch | None:
        """The next site's `Prefetch` when its read can run in this write: it is known (`Connection.chain_sites`), runs
        the fused kernels on this device, and its phi is a plain tensor here (not a shard: FSDP / TP gather it only
        inside that site's own call; not on another device or meta: a pipeline stage's last site). Never while
        compiling (the hand-over is Python state between two sites)."""
        nxt = site.next_site
        if nxt is None or torch.compiler.is_compiling() or not isinstance(nxt.step, SinglePassStep):
            return None
        phi = nxt.phi
        plain = type(phi) in (torch.Tensor, torch.nn.Parameter) and phi.device == state.device
        if not plain or not nxt.step.fused(state) or phi.shape[0] != nxt.n * state.shape[-1]:
            return None
        return Prefetch(phi, nxt.cfg.eps)


class SinglePassSite(MHCSite):
    """An mHC site (same parameters, init and coefficient math as `MHCSite`) run by a `SinglePassStep`: it reads with
    the carried mix and hands its own H_pre on as the next site's. Input and output: the packed state.
    `next_site`: the site that runs after this one in the same module (`MHCSinglePass.chain_sites`), or None; its
    `fetched` holds the read this site's fused write computed for it (`SinglePassStep.run`)."""

    lagged = True  # decode runs this site as it is (infer/sites.py)
    _next: tuple = ()  # (the next site,): a tuple, so that the module does not register it as a child
    fetched: Prefetch | None = None

    @property
    def next_site(self) -> SinglePassSite | None:
        return self._next[0] if self._next else None

    def forward(self, state: torch.Tensor, sublayer) -> torch.Tensor:
        return self.step.run(self, state, sublayer, self._post_res_runner)

    @property
    def backend(self) -> str:
        return self.step.name

    @backend.setter
    def backend(self, name: str) -> None:
        self.step = SinglePassStep(name, self.n)

    def coefficients(self, x: torch.Tensor):
        """(h_pre, h_post, h_res) of the streams; takes the packed state or the streams alone (the diagnostics)."""
        return super().coefficients(x[..., : self.n, :] if x.shape[-2] == self.n + 1 else x)


class MixCollapse(Collapse):
    """The single-pass output collapse: the carried mix (the last FFN site's H_pre) reads the streams. No weights."""

    def __init__(self, n: int):
        super().__init__("mix")
        self.n = n

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        x, mix = split_state(state, self.n)
        acc = torch.promote_types(x.dtype, torch.float32)
        return (mix.to(acc).unsqueeze(-2) @ x.to(acc)).squeeze(-2)  # [B, T, C]


class MHCSinglePass(Connection):
    """Single-pass mHC: the state carries the lagged read mix as row n (module docstring)."""

    site_cls = SinglePassSite

    def __init__(self, cfg: ConnectionConfig):
        super().__init__(cfg)
        self.n = cfg.n_streams
        self.n_streams = cfg.n_streams + 1  # rows of the state: n streams and the carried mix
        self.step = SinglePassStep(cfg.backend, self.n)

    def site(self, dim: int, index: int) -> SinglePassSite:
        if dim < self.n:
            raise ValueError(
                f"mhc_single_pass carries its n = {self.n} mix in a row of C = {dim} channels: need C >= n"
            )
        return SinglePassSite(dim, self.n, index, self.cfg, self.step)

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        x = h.unsqueeze(-2).expand(*h.shape[:-1], self.n, h.shape[-1])  # [B, T, n, C]
        mix = F.one_hot(torch.zeros(h.shape[:-1], dtype=torch.long, device=h.device), self.n)  # m_0 = e_0
        return pack_state(x, mix)  # [B, T, n+1, C]

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        return MixCollapse(self.n)(x)

    def collapse_module(self, dim: int) -> Collapse:
        return MixCollapse(self.n)

    def chain_sites(self, sites: list) -> None:
        """Tell each site which runs next (the model's forward order), so its write can compute that site's read."""
        for site, nxt in zip(sites, [*sites[1:], None]):
            site._next = (nxt,) if isinstance(nxt, SinglePassSite) else ()


CONNECTIONS["mhc_single_pass"] = MHCSinglePass  # `build_connection` finds it (mhc_train.model imports this file)
