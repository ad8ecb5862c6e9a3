"""The losses of `token_dropped_loss` (`dropped_losses/`): each formula on hand-built tensors, the shift, the bounds,
the ramp, the normalisation over a step's micro-batches, the config's refusals, and the trainer's wiring."""

import math
from types import SimpleNamespace

import pytest
import torch
from trl import SFTTrainer

from tests.conftest import cpu_args
from tests.unit.test_dropped_loss import build  # the same 2-step fixed-mode trainer
from token_clean_trainer import TokenCleanSFTTrainer
from token_clean_trainer.columns import DROPPED_LABELS_KEY
from token_clean_trainer.dropped_loss import DroppedTokens
from token_clean_trainer.dropped_losses import DROPPED_LOSSES, DroppedTokenTerm, ascent, ramped_weight, unlikelihood

# One sequence of 4 tokens over a vocabulary of 3. The logits at position t predict the label at t + 1:
# position 1 gives p = (0.6, 0.2, 0.2), position 2 gives p = (1/6, 4/6, 1/6).
LOGITS = torch.tensor(
    [[[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0], [0.0, math.log(4.0), 0.0], [5.0, -5.0, 0.0]]], requires_grad=True
)
# Dropped: the label 0 at position 2 (p = 0.6) and the label 1 at position 3 (p = 4/6).
DROPPED = torch.tensor([[-100, -100, 0, 1]])


def term(name: str, labels=DROPPED, logits=LOGITS, weight=1.0, count=None) -> torch.Tensor:
    loss = DroppedTokenTerm(DROPPED_LOSSES[name], weight=weight, ramp=0.0, progress=lambda: 0.0)
    dropped = DroppedTokens(labels, num_items_in_batch=7, num_dropped_in_batch=count)
    return loss(None, SimpleNamespace(logits=logits), {}, dropped)


def test_ascent_by_hand():
    # -lambda * mean of CE = lambda * mean of log p over the two dropped tokens.
    expected = 0.5 * (math.log(0.6) + math.log(4 / 6)) / 2
    assert term("ascent", weight=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_unlikelihood_by_hand():
    expected = 0.5 * (-math.log(1 - 0.6) - math.log(1 - 4 / 6)) / 2
    assert term("unlikelihood", weight=0.5).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["ascent", "unlikelihood"])
def test_position_j_reads_the_logits_at_j_minus_1(name):
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 3)
    log_probs = logits.log_softmax(-1)
    for position, label in [(1, 2), (2, 0), (3, 1)]:
        labels = torch.full((1, 4), -100)
        labels[0, position] = label
        expected = DROPPED_LOSSES[name].per_token(log_probs[0, position - 1, label])
        assert term(name, labels=labels, logits=logits).item() == pytest.approx(expected.item(), rel=1e-6)
    # Position 0 has no prediction: a label there is never read.
    first = torch.tensor([[1, -100, -100, -100]])
    assert term(name, labels=first, logits=logits).item() == 0.0


def test_ascent_clips_each_token_at_10_nats():
    log_probs = torch.tensor([-20.0, -3.0], requires_grad=True)
    values = ascent.per_token(log_probs)
    assert values.tolist() == [-ascent.MAX_NATS, -3.0]
    values.sum().backward()
    assert log_probs.grad.tolist() == [0.0, 1.0]  # past the clip the ascent stops pushing


def test_unlikelihood_is_stable_and_bounded():
    log_probs = torch.tensor([0.0, -1e-9, -0.1, -0.7, -50.0], requires_grad=True)
    values = unlikelihood.per_token(log_probs)
    p = log_probs.detach().double().exp()
    assert torch.isfinite(values).all()
    assert values[0].item() == pytest.approx(-math.log(unlikelihood.P_GAP), rel=1e-4)  # p clamped below 1
    assert values[2:].tolist() == pytest.approx((-torch.log1p(-p[2:])).tolist(), rel=1e-5)
    values.sum().backward()
    assert torch.isfinite(log_probs.grad).all()


def test_ramp_at_start_middle_and_end():
    assert ramped_weight(0.25, 0.5, 0.0) == 0.0
    assert ramped_weight(0.25, 0.5, 0.25) == pytest.approx(0.125)
    assert ramped_weight(0.25, 0.5, 0.5) == pytest.approx(0.25)
    assert ramped_weight(0.25, 0.5, 1.0) == pytest.approx(0.25)
    assert ramped_weight(0.25, 0.0, 0.0) == 0.25  # no ramp: the full weight from the first step
    # The trainer's progress is global_step / max_steps.
    state = SimpleNamespace(state=SimpleNamespace(global_step=5, max_steps=20))
    assert TokenCleanSFTTrainer._training_progress(state) == 0.25
    loss = DroppedTokenTerm(DROPPED_LOSSES["ascent"], weight=0.25, ramp=0.5, progress=lambda: 0.25)
    value = loss(None, SimpleNamespace(logits=LOGITS), {}, DroppedTokens(DROPPED))
    assert loss.last_weight == pytest.approx(0.125)
    assert value.item() == pytest.approx(term("ascent", weight=0.125).item())


@pytest.mark.parametrize("name", ["ascent", "unlikelihood"])
def test_terms_of_two_micro_batches_sum_to_the_mean_over_the_step(name):
    torch.manual_seed(1)
    first, second = torch.randn(1, 4, 3), torch.randn(1, 4, 3)
    labels_first = torch.tensor([[-100, 2, -100, 0]])  # 2 dropped
    labels_second = torch.tensor([[-100, -100, 1, -100]])  # 1 dropped
    step = term(name, labels_first, first, count=3) + term(name, labels_second, second, count=3)
    per_token = DROPPED_LOSSES[name].per_token
    values = [
        per_token(first.log_softmax(-1)[0, 0, 2]),
        per_token(first.log_softmax(-1)[0, 2, 0]),
        per_token(second.log_softmax(-1)[0, 1, 1]),
    ]
    assert step.item() == pytest.approx(sum(v.item() for v in values) / 3, rel=1e-6)
    # Without a step count, a micro-batch divides by its own dropped tokens.
    alone = term(name, labels_first, first)
    assert alone.item() == pytest.approx((values[0] + values[1]).item() / 2, rel=1e-6)


def test_a_micro_batch_without_dropped_tokens_gives_a_differentiable_zero():
    value = term("unlikelihood", labels=torch.full((1, 4), -100), count=3)
    assert value.item() == 0.0
    value.backward()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"token_selection": "full"}, "token_dropped_loss='ascent'.*`token_selection='full'` drops no token"),
        ({"token_cleaning": "none"}, "token_dropped_loss='ascent'.*`token_cleaning='none'` drops no token"),
        ({"token_dropped_weight": -0.1}, "`token_dropped_weight` must be a number >= 0"),
        ({"token_dropped_weight": float("inf")}, "`token_dropped_weight` must be a number >= 0"),
        ({"token_dropped_ramp": 1.5}, r"`token_dropped_ramp` must be a number in \[0, 1\]"),
        ({"token_dropped_loss": "forget"}, "`token_dropped_loss` must be 'none', 'ascent' or 'unlikelihood'"),
    ],
)
def test_config_refuses(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cpu_args(tmp_path, **{"token_dropped_loss": "ascent", **overrides})


def test_config_defaults(tmp_path):
    args = cpu_args(tmp_path)
    assert (args.token_dropped_loss, args.token_dropped_weight, args.token_dropped_ramp) == ("none", 0.05, 0.5)
    # A weight or ramp without a loss is harmless; full selection without a loss is the plain baseline.
    cpu_args(tmp_path, token_selection="full", token_dropped_weight=1.0)


def hand_batch():
    labels = torch.tensor([[-100, -100, 30, 31, 32, 33], [-100, 40, 41, 42, -100, -100]])
    dropped = torch.tensor([[-100, -100, -100, 31, -100, -100], [-100, -100, 41, -100, -100, -100]])
    inputs = {
        "input_ids": torch.tensor([[1, 20, 30, 31, 32, 33], [1, 40, 41, 42, 2, 2]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
        "labels": labels.masked_fill(dropped != -100, -100),
    }
    return inputs, dropped


def with_dropped_loss(name, loss_type, tmp_path, model_dir, ref_dir, tokenizer):
    """The 2-step fixed-mode trainer with `token_dropped_loss=name` at lambda 0.25 from the first step."""
    settings = dict(token_dropped_loss=name, token_dropped_weight=0.25, token_dropped_ramp=0.0)
    return build(tmp_path, model_dir, ref_dir, tokenizer, loss_type=loss_type, **settings)


def test_none_installs_nothing_and_the_loss_is_sft_trainers(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    trainer = build(tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer)
    # No hook: the collator builds no `dropped_labels` (see test_dropped_loss.py for the batches themselves).
    assert trainer.dropped_token_loss is None and trainer.data_collator.dropped_labels is False
    inputs, _ = hand_batch()
    trainer.model.eval()
    plain = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=torch.tensor(5))
    sft = SFTTrainer.compute_loss(trainer, trainer.model, dict(inputs), num_items_in_batch=torch.tensor(5))
    assert torch.equal(plain, sft)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_fused_head_term_matches_the_full_logits(loss_type, tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer):
    trainer = with_dropped_loss("unlikelihood", loss_type, tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer)
    assert isinstance(trainer.dropped_token_loss, DroppedTokenTerm) and trainer.data_collator.dropped_labels
    inputs, dropped = hand_batch()
    trainer.model.eval()  # no dropout: every forward below is the same computation
    plain = SFTTrainer.compute_loss(trainer, trainer.model, dict(inputs), num_items_in_batch=torch.tensor(5))
    trainer._num_dropped_in_batch = torch.tensor(2)
    total = trainer.compute_loss(
        trainer.model, {**inputs, DROPPED_LABELS_KEY: dropped}, num_items_in_batch=torch.tensor(5)
    )
    with torch.no_grad():
        logits = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    p = logits[:, :-1].float().softmax(-1).gather(-1, dropped[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = 0.25 * (-torch.log1p(-p))[dropped[:, 1:] != -100].sum() / 2
    # The random tiny model gives every token p ~ 1/vocab: the term is small, so it is read from the logs exactly
    # and from the total up to float32 rounding of the main loss.
    assert trainer._metrics["train"]["dropped_loss"][-1] == pytest.approx(expected.item(), rel=1e-4)
    assert (total - plain).item() == pytest.approx(expected.item(), abs=1e-6)
    share = trainer._metrics["train"]["dropped_loss_share"][-1]
    assert share == pytest.approx(expected.item() / (plain.item() + expected.item()), rel=1e-4)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_one_forward_gives_the_two_forward_loss_gradient_and_metrics(
    loss_type, tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer
):
    trainer = with_dropped_loss("ascent", loss_type, tmp_path, tiny_model_dir, tiny_ref_dir, tokenizer)
    model = trainer.model
    model.eval()  # no dropout: the forwards below are the same computation
    inputs, dropped = hand_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    trainer._num_dropped_in_batch = torch.tensor(2)
    total = trainer.compute_loss(model, {**inputs, DROPPED_LABELS_KEY: dropped}, num_items_in_batch=torch.tensor(5))
    handle.remove()
    assert len(forwards) == 1  # kept and dropped tokens from the same forward
    metrics = {key: trainer._metrics["eval"][key][-1] for key in ("entropy", "mean_token_accuracy")}
    one_forward = torch.autograd.grad(total, params)

    # The two-forward computation: SFTTrainer's loss on the kept labels, and the dropped labels' own fused forward.
    plain = SFTTrainer.compute_loss(trainer, model, dict(inputs), num_items_in_batch=torch.tensor(5))
    # TRL's metrics of the kept labels are the ones the one-forward loss left in the logs.
    assert metrics == {key: trainer._metrics["eval"][key][-1] for key in metrics}
    log_probs = model(**{k: inputs[k] for k in ("input_ids", "attention_mask")}, labels=dropped, fused_lm_head=True)
    mask = dropped[:, 1:] != -100
    expected = trainer.args.token_dropped_weight * (-torch.clamp(-log_probs.log_probs, max=10.0))[mask].sum() / 2
    torch.testing.assert_close(total, plain + expected, atol=1e-7, rtol=1e-6)
    two_forwards = torch.autograd.grad(plain + expected, params)
    for got, want in zip(one_forward, two_forwards, strict=True):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
