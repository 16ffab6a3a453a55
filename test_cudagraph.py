"""Tests for cudagraph.py (train.py --cuda_graph). CPUs have no CUDA graphs: the tests record by
keeping the body and replaying it on kernels.py's static route, the route a CUDA graph records;
one test records a real graph where a GPU is."""

import pytest
import torch

import cudagraph
import gpt
import kernels
import train


def test_cuda_graph_needs_cuda_a_topk_sae_and_no_skipping(monkeypatch):
    """Checked before the device is resolved: --cuda_graph alone passes where CUDA is."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cudagraph.check_config(train.TrainConfig(cuda_graph=True))
    cudagraph.check_config(train.TrainConfig(cuda_graph=True, device="cuda:0"))
    for bad in ({"device": "cpu"}, {"activation": "batchtopk"}, {"skip_nonfinite": True}):
        with pytest.raises(gpt.UserError, match="--cuda_graph records the step of a TopK SAE in one process on CUDA"):
            cudagraph.check_config(train.TrainConfig(cuda_graph=True, **bad))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpt.UserError, match="use --device cuda"):
        cudagraph.check_config(train.TrainConfig(cuda_graph=True))


@pytest.fixture
def recorded(monkeypatch):
    """cudagraph.record replaced by the body itself, run on the static route; -> the bodies recorded."""
    bodies = []

    def record(body):
        bodies.append(body)

        def replay():
            with monkeypatch.context() as m:
                m.setattr(kernels, "_STATIC", True)
                body()
        return replay
    monkeypatch.setattr(cudagraph, "record", record)
    return bodies


def graph_run(model, out_dir, cuda_graph, device="cpu", **kw):
    c = train.TrainConfig(model=model, out_dir=str(out_dir), run="graph" if cuda_graph else "eager", ctx_len=32,
                          batch_size=256, shuffle_tokens=2048, n_latents=512, k=4, dead_tokens=512, eval_tokens=512,
                          cuda_graph=cuda_graph, device=device, dtype="float32", **kw).resolve()
    return train.start_run(c, resume=False)


def steps(run, n, monkeypatch, static=False):
    """n training steps as train.train loops them -> the logged [loss, fvu, aux_loss, l0] of each."""
    logged = []
    for _ in range(n):
        x, dead = run.stream.batch(run.step), run.tokens_since_fired >= run.c.dead_tokens
        with monkeypatch.context() as m:
            m.setattr(kernels, "_STATIC", static)
            logged.append(train.train_step(run, x, dead).clone())
        run.step += 1
    return torch.stack(logged)


def test_cuda_graph_step_replays_the_update_on_the_static_route(tiny_gpt_ckpt, tmp_path, recorded, monkeypatch):
    """3 eager warm-up steps, then replays, all on the static route: the same losses, weights,
    dead-latent counts and restarts as eager steps on it (AuxK live from step 2, restarts every 3 steps),
    up to Adam's rounding with a tensor learning rate; recorded once; the checkpoint's Adam state
    has a plain learning rate, as any run resumes it."""
    eager, graph = (graph_run(tiny_gpt_ckpt, tmp_path, g, tokens=256 * 12, lr_decay=0.5) for g in (False, True))
    want, got = steps(eager, 12, monkeypatch, static=True), steps(graph, 12, monkeypatch)
    assert len(recorded) == 1 and (got[3:, 2] > 0).all()  # AuxK in every replay
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, p in eager.sae.named_parameters():
        torch.testing.assert_close(dict(graph.sae.named_parameters())[name], p, rtol=1e-4, atol=1e-5)
    assert torch.equal(graph.tokens_since_fired, eager.tokens_since_fired) and graph.restarts == eager.restarts > 0
    group = graph.checkpoint({})["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(train.lr_at(graph.c, 11, 12)) and group["capturable"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench.py's GPU run runs it)")
def test_cuda_graph_on_a_gpu_replays_the_update_on_the_static_route(tiny_gpt_ckpt, tmp_path, monkeypatch):
    """The test above with a real CUDA graph: recorded once, the same trajectory as eager steps on
    the static route, in fp32 (TF32 off: the two order their sums differently)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    eager, graph = (graph_run(tiny_gpt_ckpt, tmp_path, g, "cuda", tokens=256 * 12, lr_decay=0.5) for g in (False, True))
    want, got = steps(eager, 12, monkeypatch, static=True), steps(graph, 12, monkeypatch)
    assert (got[3:, 2] > 0).all() and graph.graph.replay is not None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name, p in eager.sae.named_parameters():
        torch.testing.assert_close(dict(graph.sae.named_parameters())[name], p, rtol=1e-3, atol=1e-4)
    assert graph.restarts == eager.restarts > 0


def test_cuda_graph_widens_auxks_candidates_before_more_latents_die(tiny_gpt_ckpt, tmp_path, recorded, monkeypatch):
    """Recorded with few latents near death, AuxK looks at 8 k_aux candidates; once a replay finds
    more within a batch of dead_tokens, the next step runs eagerly and the one after records
    again with twice as many candidates."""
    run = graph_run(tiny_gpt_ckpt, tmp_path, True, tokens=256 * 12)
    steps(run, 3, monkeypatch)  # the warm-up
    run.tokens_since_fired.zero_()
    steps(run, 1, monkeypatch)
    k_aux = run.sae.cfg.k_aux
    assert len(recorded) == 1 and run.sae._scratch["aux_candidates"] == 8 * k_aux
    run.tokens_since_fired[:10 * k_aux] = run.c.dead_tokens  # dead, and still dead after the next step
    steps(run, 1, monkeypatch)  # a replay that reads the bound
    assert run.graph.replay is None and run.graph.eager_left == 1
    steps(run, 2, monkeypatch)  # eager, then recorded again
    assert len(recorded) == 2 and run.sae._scratch["aux_candidates"] >= 2 * 10 * k_aux


def test_cuda_graph_stops_on_a_non_finite_batch(tiny_gpt_ckpt, tmp_path, recorded, monkeypatch):
    run = graph_run(tiny_gpt_ckpt, tmp_path, True, tokens=256 * 12)
    steps(run, 4, monkeypatch)
    orig = run.stream.batch
    monkeypatch.setattr(run.stream, "batch", lambda step: orig(step) * float("nan"))
    with pytest.raises(gpt.UserError, match="non-finite activations at step 4"):
        steps(run, 1, monkeypatch)
