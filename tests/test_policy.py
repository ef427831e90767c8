"""The adversarial alpha policy: it finds the alphas a trainer finds hard, within Eq. 6's budget."""

import numpy as np
import pytest

from edsam_online.policy import AdversarialConfig, AdversarialPolicy, load_policy, save_policy

RHO = 1.0


def _peak_at(center, width=0.1, height=1.0, base=2.0):
    return lambda a: base + height * np.exp(-((a - center) ** 2) / (2 * width**2))


def _train(policy, loss_of, rounds=30, per_round=256, score_of=None, seed=0):
    """Feed ``rounds`` of feedback from a stand-in trainer; returns the policy."""
    rng = np.random.default_rng(seed)
    for step in range(rounds):
        alpha = policy.draw(per_round)
        if alpha is None:  # what the producer does then: Eq. 9's uniform draw
            alpha = rng.uniform(-RHO, RHO, per_round).astype(np.float32)
        loss = loss_of(alpha) + rng.normal(0, 0.3, per_round)
        score = np.ones(per_round) if score_of is None else score_of(alpha)
        policy.update(alpha, score, np.maximum(loss, 0), np.full(per_round, step))
    return policy


def test_the_policy_draws_most_alphas_near_the_alpha_where_the_trainer_loss_peaks_while_every_bin_is_still_tried():
    policy = _train(AdversarialPolicy(RHO, AdversarialConfig(lam=0.0)), _peak_at(0.3))
    alpha = policy.draw(4000)
    assert np.mean(np.abs(alpha - 0.3) <= 0.1) >= 0.5
    cfg = policy.cfg
    assert policy.probabilities().min() >= cfg.explore / cfg.bins - 1e-12  # the exploration floor
    assert len(np.unique(policy.bin_of(alpha))) == cfg.bins


def test_a_large_lambda_pulls_the_choices_back_towards_alpha_zero():
    free = _train(AdversarialPolicy(RHO, AdversarialConfig(lam=0.0)), _peak_at(0.6)).draw(4000)
    costly = _train(AdversarialPolicy(RHO, AdversarialConfig(lam=20.0)), _peak_at(0.6)).draw(4000)
    assert np.mean(np.abs(costly)) < np.mean(np.abs(free)) - 0.2
    assert np.mean(np.abs(costly) <= 0.2) >= 0.5


def test_without_feedback_the_policy_leaves_the_draw_to_eq_9():
    policy = AdversarialPolicy(RHO, AdversarialConfig())
    assert policy.draw(8) is None and policy.probabilities() is None
    policy.update(np.zeros(10), np.ones(10), np.ones(10), np.zeros(10))  # fewer than min_feedback
    assert policy.draw(8) is None
    assert AdversarialPolicy(0.0, AdversarialConfig(min_feedback=0)).draw(8) is None  # rho = 0: nothing to choose
    assert AdversarialPolicy(RHO, AdversarialConfig(min_feedback=0)).draw(8) is None  # nothing heard at all


def test_samples_that_lose_their_content_do_not_pull_the_policy_however_high_their_loss():
    # beyond |alpha| = 0.5 the stand-in generator destroys the class: the loss is highest there,
    # but the fidelity scorer fails those samples
    def loss_of(a):
        return np.where(np.abs(a) > 0.5, 4.0, _peak_at(0.3)(a))

    def score_of(a):
        return np.where(np.abs(a) > 0.5, 1 / 3, 1.0)

    alpha = _train(AdversarialPolicy(RHO, AdversarialConfig(lam=0.0)), loss_of, score_of=score_of).draw(4000)
    assert np.mean(np.abs(alpha) > 0.5) <= 0.1
    assert np.mean(np.abs(alpha - 0.3) <= 0.1) >= 0.5
    # the same losses, every sample faithful: the policy goes where the loss is
    unfiltered = _train(AdversarialPolicy(RHO, AdversarialConfig(lam=0.0)), loss_of).draw(4000)
    assert np.mean(np.abs(unfiltered) > 0.5) >= 0.5


def test_the_same_feedback_and_seed_make_the_same_choices():
    a = _train(AdversarialPolicy(RHO, AdversarialConfig(), seed=3), _peak_at(0.3), rounds=10)
    b = _train(AdversarialPolicy(RHO, AdversarialConfig(), seed=3), _peak_at(0.3), rounds=10)
    assert np.array_equal(a.draw(100), b.draw(100))
    c = _train(AdversarialPolicy(RHO, AdversarialConfig(), seed=4), _peak_at(0.3), rounds=10)
    assert not np.array_equal(a.draw(100), c.draw(100))


def test_feedback_from_older_model_steps_counts_less():
    cfg = AdversarialConfig(lam=0.0, half_life_steps=100, min_feedback=0)
    policy = AdversarialPolicy(RHO, cfg)
    hard_then, hard_now = np.full(100, -0.9), np.full(100, 0.9)
    policy.update(hard_then, np.ones(100), np.full(100, 5.0), np.zeros(100))
    policy.update(hard_now, np.ones(100), np.full(100, 1.0), np.full(100, 500))
    # the 5-nat losses were measured 5 half-lives ago: they weigh 1/32 now
    first, last = policy.bin_of(np.array([-0.9, 0.9]))
    assert policy.weight[first] == pytest.approx(100 / 32)
    assert policy.weight[last] == pytest.approx(100)
    # a late entry about an old model step joins at its own, discounted weight
    policy.update(np.array([0.9]), np.ones(1), np.array([1.0]), np.array([400]))
    assert policy.weight[last] == pytest.approx(100.5)


def test_feedback_entries_that_are_not_finite_negative_or_out_of_range_are_skipped():
    policy = AdversarialPolicy(RHO, AdversarialConfig(min_feedback=0))
    n = policy.update(np.array([0.1, 0.2, 0.3, 2.0, np.nan, 0.4]), np.ones(6),
                      np.array([np.nan, np.inf, -1.0, 1.0, 1.0, 1.0]), np.array([0, 0, 0, 0, 0, np.inf]))
    assert n == 0 and policy.weight.sum() == 0 and policy.applied == 0
    assert policy.update(np.array([0.1]), np.array([1.0]), np.array([2.0]), np.array([3])) == 1


@pytest.mark.parametrize("key, value", [("bins", 1), ("lam", -1.0), ("temperature", 0.0), ("explore", 0.0),
                                        ("explore", 1.5), ("half_life_steps", 0.0), ("min_score", 2.0),
                                        ("min_feedback", -1.0)])
def test_a_bad_setting_is_refused_naming_it(key, value):
    with pytest.raises(ValueError, match=key):
        AdversarialConfig(**{key: value})


def test_a_saved_policy_comes_back_with_the_same_values_and_draws(tmp_path):
    policy = _train(AdversarialPolicy(RHO, AdversarialConfig(lam=0.0), seed=3), _peak_at(0.3))
    save_policy(policy, tmp_path / "policy" / "producer0.msgpack")
    restored = AdversarialPolicy(RHO, AdversarialConfig(lam=0.0), seed=99)  # a restart draws another seed
    load_policy(restored, tmp_path / "policy" / "producer0.msgpack")
    assert restored.applied == policy.applied and restored.newest_step == policy.newest_step
    np.testing.assert_array_equal(restored.probabilities(), policy.probabilities())
    np.testing.assert_array_equal(restored.draw(500), policy.draw(500))  # the draws go on where they were


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "other_bins", "nan", "negative_weight"])
def test_a_damaged_or_foreign_policy_file_is_refused_and_changes_nothing(tmp_path, damage):
    import msgpack

    path = tmp_path / "producer0.msgpack"
    save_policy(_train(AdversarialPolicy(RHO, AdversarialConfig(lam=0.0)), _peak_at(0.3), rounds=3), path)
    state = msgpack.unpackb(path.read_bytes())
    if damage == "garbage":
        path.write_bytes(b"\x00not msgpack\xff" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    else:
        if damage == "foreign":
            state = {"format": "something-else/1", **{k: v for k, v in state.items() if k != "format"}}
        elif damage == "other_bins":
            state["bins"] = 7
        elif damage == "nan":
            state["reward_sum"][2] = float("nan")
        else:
            state["weight"][0] = -1.0
        path.write_bytes(msgpack.packb(state))
    fresh = AdversarialPolicy(RHO, AdversarialConfig(lam=0.0))
    with pytest.raises(ValueError, match="is not a saved policy state"):
        load_policy(fresh, path)
    assert fresh.applied == 0 and fresh.probabilities() is None and fresh.newest_step is None
