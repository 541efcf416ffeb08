"""The papers' real architectures on the CPU, with random weights (offline, nothing downloaded).

The other tests run CAP on a tiny CLIP and Co-Reg on a narrow CNN; these check that the same code fits the published
networks: open_clip's ViT-B-32 through one CAP training step (MaPLe prompts at cap.py's default depth, the three
adapters, SGD, schedule and GradScaler wired as cap.main wires them) and one cap.evaluate; MaPLe built on ViT-B-16 and
ViT-L-14 with one image and one text forward each; one SGD step of Co-Reg's PreAct-ResNet-18 at 32 and 64 px.

    python -m pytest -q tests/test_arch.py --durations=0

One torch thread (tests/conftest.py); most of the time goes to building and running the three CLIPs;
ViT-L-14 (428 M parameters, 1.7 GB in float32) is built once, in its own test, and freed after it.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import cap
import common
import coreg

CLASSNAMES = ["cat", "dog", "car", "tree"]  # C = 4: the text tower's cost grows with C (77 tokens a class)
N_MAIN, N_UNLABELED, N_TEST = 2, 2, 2  # D_PL images, unlabeled images (weak + strong view each), test images
PX = 224


def random_images(n, g):
    return torch.randn(n, 3, PX, PX, generator=g)  # [n, 3, 224, 224], about the scale of normalised images


@pytest.fixture(scope="module")
def defaults():
    """cap.py's defaults: the release's prompt depth, lr, weight decay, schedule, τ."""
    return cap.parse_args([])


@pytest.fixture(scope="module")
def vit_b32():
    """open_clip's ViT-B-32, random weights (load_clip seeds its init with 0), frozen as cap.main freezes it."""
    model, _, tokenizer = common.load_clip("ViT-B-32", "none", "cpu")
    return model.requires_grad_(False), tokenizer


@pytest.fixture(scope="module")
def cap_step(vit_b32, defaults):
    """One cap.train_step on ViT-B-32 as cap.main wires it, then one cap.evaluate; what the tests check, recorded.

    τ = 0 so every weak-view pseudolabel passes and L_UL (the pseudo adapter) is exercised: with random weights the
    softmax over 4 classes never reaches cap.py's τ = 0.85. M is a uniform 0.5 margin off the diagonal, as a later
    epoch has (epoch 0's is zero)."""
    model, tokenizer = vit_b32
    args = defaults
    C = len(CLASSNAMES)
    device = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):  # build_maple's deep prompts and the adapters draw from the global RNG
        torch.manual_seed(0)
        learner, tokens = cap.build_maple(model, tokenizer, CLASSNAMES, args.prompt_depth)
        adapters = cap.build_adapters(model.text_projection.shape[1])
    opt = torch.optim.SGD([*learner.parameters(), *adapters.parameters()], args.lr, momentum=0.9, weight_decay=args.wd)
    total = args.epochs * args.iters
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: common.cosine(s, total, warmup=args.iters))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    tuner = cap.PromptTuner(model, learner, tokens, adapters, opt, sched, scaler, model.logit_scale.exp().item())

    g = torch.Generator().manual_seed(0)
    x_m, x_w, x_s = random_images(N_MAIN, g), random_images(N_UNLABELED, g), random_images(N_UNLABELED, g)
    y_m = torch.randint(C, (N_MAIN,), generator=g)  # [n_m] D_PL pseudolabels
    batch = ((x_m, y_m), (x_w, x_s), (x_m[:0], y_m[:0]))  # UL: the labeled stream empty, as cap.main passes it
    M = torch.full((C, C), 0.5).fill_diagonal_(0)  # [C, C]
    clip_before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {
        **{f"learner.{k}": p for k, p in learner.named_parameters()},
        **{f"adapters.{k}": p for k, p in adapters.named_parameters()},
    }
    trained_before = {k: p.detach().clone() for k, p in trained.items()}

    seen = SimpleNamespace(text=[], image=[], logits=[], weak_logits=[], adapted=[], vis_in=[], txt_in=[])

    def spy(mp, name, log, on_input=False):
        """cap.<name>, also logging a detached copy of its output (or of its first argument)."""
        real = getattr(cap, name)

        def wrapper(*a, **kw):
            out = real(*a, **kw)
            log.append((a[0] if on_input else out).detach().clone())
            return out

        mp.setattr(cap, name, wrapper)

    with pytest.MonkeyPatch.context() as mp:
        spy(mp, "encode_text_maple", seen.text)  # [C, D]
        spy(mp, "encode_image_maple", seen.image)  # [B, D] per pass
        spy(mp, "margin_cross_entropy", seen.logits, on_input=True)  # L_PL's logits, then L_UL's (strong view)
        spy(mp, "weak_pseudolabels", seen.weak_logits, on_input=True)  # the weak view's logits
        losses, conf, y_hat, mask = cap.train_step(
            tuner, batch, M, tau=0.0, ul_classes=torch.arange(C), weights=(float(args.main), float(args.pseudo))
        )
    grads = {k: p.grad for k, p in trained.items()}
    clip_changed = [k for k, v in model.state_dict().items() if not torch.equal(v, clip_before[k])]
    del clip_before

    # evaluate, logging the adapters' calls and every transformer block's input (where the prompts sit)
    hooks = [
        b.register_forward_pre_hook(lambda m, a: seen.vis_in.append(a[0].clone()))
        for b in model.visual.transformer.resblocks
    ]
    hooks += [
        b.register_forward_pre_hook(lambda m, a: seen.txt_in.append(a[0].clone())) for b in model.transformer.resblocks
    ]
    test_set = TensorDataset(random_images(N_TEST, g), torch.zeros(N_TEST, dtype=torch.long), torch.arange(N_TEST))
    try:
        with pytest.MonkeyPatch.context() as mp:
            spy(mp, "adapt", seen.adapted)
            pred = cap.evaluate(model, learner, tokens, test_set, device)
    finally:
        for h in hooks:
            h.remove()
    return SimpleNamespace(
        args=args,
        model=model,
        learner=learner,
        adapters=adapters,
        tokens=tokens,
        opt=opt,
        trained=trained,
        trained_before=trained_before,
        grads=grads,
        clip_changed=clip_changed,
        losses=losses,
        conf=conf,
        y_hat=y_hat,
        mask=mask,
        pred=pred,
        seen=seen,
        C=C,
    )


# -----------------------------------------------------------------------------
# CAP on ViT-B-32: one training step, then evaluation


def test_vit_b32_has_the_published_shape(vit_b32):
    model, _ = vit_b32
    v = model.visual
    assert v.image_size == (PX, PX) and v.patch_size == (32, 32) and v.grid_size == (7, 7)
    assert len(v.transformer.resblocks) == 12 and v.conv1.out_channels == 768  # vision: 12 layers, width 768
    assert len(model.transformer.resblocks) == 12 and model.token_embedding.embedding_dim == 512  # text
    assert v.proj.shape == (768, 512) and model.text_projection.shape == (512, 512)  # D = 512
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(151.3e6, rel=1e-3)


def test_maple_on_vit_b32_has_depth_minus_one_deep_prompt_pairs_coupled_text_to_vision(cap_step):
    learner, depth = cap_step.learner, cap_step.args.prompt_depth
    assert depth == 8  # cap.py's --prompt-depth default, ≤ both towers' 12 layers
    assert learner["ctx"][0].shape == (2, 512)  # n_ctx = 2 text context tokens
    assert len(learner["deep_text"]) == len(learner["deep_proj"]) == depth - 1
    assert all(t.shape == (2, 512) for t in learner["deep_text"])
    for proj in [learner["proj"], *learner["deep_proj"]]:
        assert (proj.in_features, proj.out_features) == (512, 768)  # text width -> vision width
    assert cap_step.tokens.shape == (cap_step.C, 77)


def test_cap_step_encodes_text_as_c_by_d_and_images_as_b_by_d_unit_features(cap_step):
    C, seen = cap_step.C, cap_step.seen
    assert [t.shape for t in seen.text] == [(C, 512)]
    # the weak views (no grad), then D_PL + labeled (none) + strong views in one pass
    assert [v.shape for v in seen.image[:2]] == [(N_UNLABELED, 512), (N_MAIN + N_UNLABELED, 512)]
    for f in seen.text + seen.image:
        assert torch.isfinite(f).all() and torch.allclose(f.norm(dim=1), torch.ones(len(f)), atol=1e-5)


def test_cap_step_losses_and_logits_are_finite(cap_step):
    C, seen = cap_step.C, cap_step.seen
    loss_pl, loss_ul, loss_l = cap_step.losses
    assert all(isinstance(v, float) for v in cap_step.losses)
    assert loss_pl > 0 and loss_ul > 0 and loss_l == 0  # τ = 0: every pseudolabel passes; no labeled images
    assert [z.shape for z in seen.weak_logits] == [(N_UNLABELED, C)]
    assert [z.shape for z in seen.logits] == [(N_MAIN, C), (N_UNLABELED, C)]  # L_PL's, then L_UL's (strong view)
    for z in seen.weak_logits + seen.logits:
        assert torch.isfinite(z).all()
    assert cap_step.mask.tolist() == [1.0] * N_UNLABELED and torch.isfinite(cap_step.conf).all()
    assert ((0 <= cap_step.y_hat) & (cap_step.y_hat < C)).all()


def test_cap_step_leaves_every_clip_weight_without_a_gradient_and_unchanged(cap_step):
    params = list(cap_step.model.parameters())
    assert len(params) > 100
    assert all(p.grad is None and not p.requires_grad for p in params)
    assert cap_step.clip_changed == []  # the whole state dict, buffers too


def test_cap_step_gradients_reach_every_prompt_and_adapter_and_the_optimiser_moves_them(cap_step):
    grads = cap_step.grads
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    groups = ["learner.ctx", "learner.proj", "learner.deep_text", "learner.deep_proj"]
    groups += ["adapters.main", "adapters.pseudo", "adapters.text"]
    for group in groups:  # each part of the learner and each adapter got a non-zero gradient
        assert any(g.abs().sum() > 0 for k, g in grads.items() if k.startswith(group + ".")), group
    moved = [k for k, p in cap_step.trained.items() if not torch.equal(p.detach(), cap_step.trained_before[k])]
    assert sorted(moved) == sorted(cap_step.trained)


def test_cap_step_steps_the_schedule_from_the_warm_up(cap_step):
    a = cap_step.args
    expected = a.lr * common.cosine(1, a.epochs * a.iters, warmup=a.iters)  # after step 0 of the linear warm-up
    assert cap_step.opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_evaluate_predicts_a_class_per_test_image_with_every_adapter_off(cap_step):
    pred = cap_step.pred
    assert pred.shape == (N_TEST,) and pred.dtype == torch.long
    assert ((0 <= pred) & (pred < cap_step.C)).all()
    assert cap_step.seen.adapted == []


def test_evaluate_puts_the_coupled_deep_prompts_in_the_first_depth_minus_one_layers_after_layer_0(cap_step):
    learner, depth, seen = cap_step.learner, cap_step.args.prompt_depth, cap_step.seen
    assert len(seen.vis_in) == len(seen.txt_in) == 12
    assert all(x.shape == (N_TEST, 1 + 49 + 2, 768) for x in seen.vis_in)  # class token, 7x7 patches, 2 prompts
    assert all(x.shape == (cap_step.C, 77, 512) for x in seen.txt_in)
    with torch.no_grad():
        shallow = learner["proj"](learner["ctx"][0])  # [2, 768]
        deep_vis = [proj(t) for proj, t in zip(learner["deep_proj"], learner["deep_text"])]
    assert not torch.allclose(seen.vis_in[0][:, -2:], shallow.expand(N_TEST, -1, -1))  # ln_pre came after it
    for i in range(1, depth):
        assert torch.allclose(seen.vis_in[i][:, -2:], deep_vis[i - 1].expand(N_TEST, -1, -1), atol=1e-6)
        assert torch.allclose(seen.txt_in[i][:, 1:3], learner["deep_text"][i - 1].expand(cap_step.C, -1, -1))


# -----------------------------------------------------------------------------
# MaPLe on the larger CLIPs: build, one image and one text forward


@pytest.mark.parametrize(
    "name, dim, patch, grid, vis_layers, vis_width, txt_width",
    [("ViT-B-16", 512, 16, 14, 12, 768, 512), ("ViT-L-14", 768, 14, 16, 24, 1024, 768)],
)
def test_maple_builds_and_encodes_on_the_larger_clips(
    defaults, name, dim, patch, grid, vis_layers, vis_width, txt_width
):
    model, _, tokenizer = common.load_clip(name, "none", "cpu")  # random init: most of ViT-L-14's time
    model.requires_grad_(False)
    v = model.visual
    assert v.image_size == (PX, PX) and v.patch_size == (patch, patch) and v.grid_size == (grid, grid)
    assert (len(v.transformer.resblocks), v.conv1.out_channels) == (vis_layers, vis_width)
    assert (len(model.transformer.resblocks), model.token_embedding.embedding_dim) == (12, txt_width)
    depth = defaults.prompt_depth
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        learner, tokens = cap.build_maple(model, tokenizer, CLASSNAMES[:2], depth)
    assert len(learner["deep_text"]) == len(learner["deep_proj"]) == depth - 1
    assert (learner["proj"].in_features, learner["proj"].out_features) == (txt_width, vis_width)
    ln_pre_in = []
    hook = v.ln_pre.register_forward_pre_hook(lambda m, a: ln_pre_in.append(a[0].shape))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        image = cap.encode_image_maple(model, learner, random_images(1, g))
        text = cap.encode_text_maple(model, learner, tokens)
    hook.remove()
    assert ln_pre_in == [(1, 1 + grid * grid + 2, vis_width)]
    assert image.shape == (1, dim) and text.shape == (2, dim)
    for f in (image, text):
        assert torch.isfinite(f).all() and torch.allclose(f.norm(dim=1), torch.ones(len(f)), atol=1e-5)


# -----------------------------------------------------------------------------
# Co-Reg: its PreAct-ResNet-18, one SGD step


@pytest.mark.parametrize("px", [32, 64])
def test_coreg_preact18_takes_an_sgd_step_with_finite_logits_and_unit_embeddings(px):
    C, B = 10, 4
    net = coreg.build_net("preact18", C, 0, "cpu").train()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 8 * 2 + 3  # stem, 8 pre-activation blocks of 2 convs, 3 projection shortcuts
    assert [m.out_channels for m in convs if m.kernel_size == (1, 1)] == [128, 256, 512]
    assert sum(p.numel() for m in convs for p in m.parameters()) == pytest.approx(11.2e6, rel=0.01)
    g = torch.Generator().manual_seed(px)
    x = torch.randn(B, 3, px, px, generator=g).contiguous(memory_format=torch.channels_last)  # as coreg.to_input
    y = torch.randint(C, (B,), generator=g)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)  # Co-Reg's optimiser

    logits, emb = net(x)
    assert logits.shape == (B, C) and torch.isfinite(logits).all()
    assert emb.shape == (B, 128) and torch.allclose(emb.norm(dim=1), torch.ones(B), atol=1e-5)
    # CE on the classifier, and pull the pairs (0, 1), (2, 3) together so the projection head gets a gradient too
    loss = F.cross_entropy(logits, y) - (emb[0::2] * emb[1::2]).sum(1).mean()
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    named = dict(net.named_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in named.values())
    opt.step()

    after = net.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert [k for k in named if torch.equal(after[k], before[k])] == []  # every parameter moved
    assert [k for k in after if k.endswith("num_batches_tracked") and after[k].item() != 1] == []  # BN statistics
    logits2, emb2 = net(x)
    assert torch.isfinite(logits2).all() and torch.allclose(emb2.norm(dim=1), torch.ones(B), atol=1e-5)
