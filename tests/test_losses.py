"""Eq. 11 under DDP equals the single-process loss (and gradient) on the same global batch,
with and without per-row weights, and each rank's per-row losses are those of its rows."""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from edsam_online.losses import EDSAMLoss, LossConfig
from edsam_online.runtime import free_port

WORLD = 2
LOCAL_B = 4  # real rows per rank
LOCAL_S = 3  # synthetic rows per rank


def _global_batch():
    g = torch.Generator().manual_seed(0)
    return {
        "real_x": torch.randn(WORLD * LOCAL_B, 10, generator=g),
        "real_t": torch.randn(WORLD * LOCAL_B, 10, generator=g),
        "syn_x": torch.randn(WORLD * LOCAL_S, 10, generator=g),
        "syn_t": torch.randn(WORLD * LOCAL_S, 10, generator=g),
        "syn_w": torch.tensor([1.0, 0.0, 0.5, 0.25, 1.0, 2 / 3]),  # e.g. fidelity scores
    }


class _Towers(torch.nn.Module):
    """Two linear towers + CLIP's logit scale/bias, so gradients can be compared."""

    def __init__(self, with_bias):
        super().__init__()
        torch.manual_seed(1)
        self.img = torch.nn.Linear(10, 6)
        self.txt = torch.nn.Linear(10, 6)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-1.0)) if with_bias else None

    def forward(self, x, t):
        """One forward over real and synthetic rows together, as the trainer does under DDP."""
        return F.normalize(self.img(x), dim=-1), F.normalize(self.txt(t), dim=-1), self.logit_scale.exp()


def _loss(model, batch, kind, rows_real, rows_syn, rank, world, use_extra, extra="plain"):
    loss_fn = EDSAMLoss(LossConfig(kind=kind, extra_weight=0.7), rank=rank, world_size=world)
    x = torch.cat([batch["real_x"][rows_real], batch["syn_x"][rows_syn]])
    t = torch.cat([batch["real_t"][rows_real], batch["syn_t"][rows_syn]])
    img, txt, scale = model(x, t)
    n = len(range(*rows_real.indices(len(batch["real_x"]))))
    inner = model.module if isinstance(model, DDP) else model
    return loss_fn(img[:n], txt[:n], scale, img[n:], txt[n:], logit_bias=inner.logit_bias, use_extra=use_extra,
                   extra_weights=batch["syn_w"][rows_syn] if extra == "weights" else None, row_losses=extra == "rows")


#: (loss kind, whether the step has an extra term, how the extra term is formed)
CASES = [("clip", True, "plain"), ("siglip", True, "plain"), ("clip", False, "plain"), ("clip", True, "weights"),
         ("clip", True, "rows")]


def _worker(rank, port, out_dir):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        for kind, use_extra, extra in CASES:
            model = DDP(_Towers(kind == "siglip"))
            out = _loss(
                model,
                _global_batch(),
                kind,
                slice(rank * LOCAL_B, (rank + 1) * LOCAL_B),
                slice(rank * LOCAL_S, (rank + 1) * LOCAL_S),
                rank,
                WORLD,
                use_extra,
                extra,
            )
            out["loss"].backward()
            values = torch.stack([out["loss"], out["loss_real"], out["loss_extra"]]).detach()
            dist.all_reduce(values)
            grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
            torch.save({"values": values / WORLD, "grads": grads, "rows": out.get("extra_row_loss")},
                       os.path.join(out_dir, f"{kind}{use_extra}{extra}{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)  # gloo + all_gather processes can abort at interpreter exit (runtime.end_rank)


def test_distributed_loss_and_grad_equal_single_process(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    for kind, use_extra, extra in CASES:
        model = _Towers(kind == "siglip")
        out = _loss(model, _global_batch(), kind, slice(None), slice(None), 0, 1, use_extra, extra)
        out["loss"].backward()
        expected = torch.stack([out["loss"], out["loss_real"], out["loss_extra"]]).detach()
        if use_extra:
            assert expected[2] > 0
        else:
            assert expected[2] == 0 and expected[0] == expected[1]
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"{kind}{use_extra}{extra}{rank}.pt")
            if extra == "rows":  # each rank's rows' own losses are those rows' losses on the global batch
                torch.testing.assert_close(got["rows"], out["extra_row_loss"][rank * LOCAL_S:(rank + 1) * LOCAL_S])
            else:
                assert got["rows"] is None
            torch.testing.assert_close(got["values"], expected, rtol=1e-5, atol=1e-6)
            for name, param in model.named_parameters():
                torch.testing.assert_close(got["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_eq11_adds_weighted_synthetic_term():
    torch.manual_seed(0)
    feats = [F.normalize(torch.randn(5, 8), dim=-1) for _ in range(4)]
    scale = torch.tensor(10.0)
    out = EDSAMLoss(LossConfig(extra_weight=0.5))(feats[0], feats[1], scale, feats[2], feats[3])
    assert out["loss_extra"] > 0
    torch.testing.assert_close(out["loss"], out["loss_real"] + 0.5 * out["loss_extra"])


def test_weighted_synthetic_term_is_the_weighted_mean_of_row_losses():
    torch.manual_seed(0)
    img, txt = (F.normalize(torch.randn(4, 8), dim=-1) for _ in range(2))
    scale = torch.tensor(10.0)
    loss = EDSAMLoss(LossConfig())
    plain = loss(img, txt, scale, img, txt)["loss_extra"]
    torch.testing.assert_close(loss(img, txt, scale, img, txt, extra_weights=torch.full((4,), 0.3))["loss_extra"], plain)
    logits = scale * img @ txt.T
    rows = (F.cross_entropy(logits, torch.arange(4), reduction="none")
            + F.cross_entropy(logits.T, torch.arange(4), reduction="none")) / 2
    w = torch.tensor([1.0, 0.0, 0.5, 1.0])
    torch.testing.assert_close(loss(img, txt, scale, img, txt, extra_weights=w)["loss_extra"], (w * rows).sum() / w.sum())
    reported = loss(img, txt, scale, img.clone().requires_grad_(), txt, row_losses=True)
    torch.testing.assert_close(reported["extra_row_loss"], rows)  # what a trainer sends back as feedback
    torch.testing.assert_close(reported["loss_extra"].detach(), plain)  # and the term it trains on is open_clip's
    assert not reported["extra_row_loss"].requires_grad
    with pytest.raises(ValueError, match="extra_weights"):
        loss(img, txt, scale, img, txt, extra_weights=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="clip"):
        EDSAMLoss(LossConfig(kind="siglip"))(img, txt, scale, img, txt, logit_bias=torch.tensor(0.0), extra_weights=w)


def test_siglip_without_logit_bias_is_a_clear_error():
    f = F.normalize(torch.randn(3, 4), dim=-1)
    with pytest.raises(ValueError, match="init_logit_bias"):
        EDSAMLoss(LossConfig(kind="siglip"))(f, f, torch.tensor(1.0))
