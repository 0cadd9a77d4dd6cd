"""One step's trajectory processing (``RLVRConfig.trajectory_processing``), between the rewards and the advantages.

``Trainer.prepare_step`` calls, in order (each a no-op with ``off``, which leaves the step bit-identical):

1. ``rebuild``: picks the processed groups (all-wrong groups; the ``uniform`` control draws as many at random), then
   - replay: one stored trajectory of the prompt replaces the group's last sample (the group keeps G samples);
   - lessons: a processed group not rescued by replay is re-sampled (G completions) with a lesson added to its
     prompt (``lessons``); with ``lesson_training=without`` its rows hold the prompt without the lesson;
   - the step's on-policy successes (``uniform``: any completions), up to replay_capacity per group, go into the
     store with the log-probs they were sampled with (candidates gathered in rank order: every rank the same store);
   then the whole step's texts are gathered and re-scored. The advantages, the difficulty filter, the update batch and
   its normalisers (step_rows, step_tokens) and the all_equal / solve_rate metrics all see the rebuilt groups.
2. ``shape_advantages``: replay_positive_only zeroes the negative advantages of the processed groups.
3. ``weight_batch``: each off-policy row of the update batch gets LUFFY's shaped weight through its mask
   (``weights``); the normalisers were fixed before, from the unweighted mask.

The behaviour policy of a stored or lesson-conditioned row is the trainer's policy at the step that sampled it, at the
run's temperature (its log-probs from a no-grad pass of the trainer's model: the native sampler reports none).
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from rlvr_fast.trainer.rollout.data import chat_prompt
from rlvr_fast.trainer.rollout.engines import Rollout
from rlvr_fast.trainer.rollout.seeds import derived_seed
from rlvr_fast.trainer.schema import ConfigFieldError
from rlvr_fast.trainer.trajectories.lessons import default_lesson, load_lesson_builder, scrub_gold
from rlvr_fast.trainer.trajectories.modes import LESSON_TRAINING, TRAJECTORY_MODES
from rlvr_fast.trainer.trajectories.rows import replace_rows, with_carrier
from rlvr_fast.trainer.trajectories.store import ReplayStore, StoredTrajectory
from rlvr_fast.trainer.trajectories.weights import shaped_gradient_coefficient, shaped_weight


def _logprobs(trainer, ro: Rollout, filler: Rollout) -> torch.Tensor:
    """(R, Lc) log-probs of ``ro``'s completions under the trainer's policy (no grad). Under torchrun a rank with no
    rows runs ``filler`` instead (result dropped): every rank runs the same forwards, hence the same collectives."""
    from rlvr_fast.trainer.update.loss import sequence_logprobs

    rows = len(ro.texts)
    if rows == 0 and not trainer.world.active:
        return torch.zeros(ro.completion_ids.shape, dtype=torch.float32)
    with trainer.policy.head_gathered():
        out = sequence_logprobs(trainer.model, ro if rows else filler, trainer.cfg.temperature, None, trainer.precision)
    return out if rows else out[:0]


def _group_rows(g: int, start: int, size: int) -> list[int]:
    return list(range((g - start) * size, (g - start + 1) * size))


class TrajectoryProcessor:
    """The run's trajectory processing: its mode, store and lesson builder (module doc)."""

    def __init__(self, cfg, world):
        self.cfg, self.world = cfg, world
        self.mode = TRAJECTORY_MODES[cfg.trajectory_processing]
        self.store = ReplayStore(cfg.replay_capacity) if self.mode.replay else None
        self.builder = load_lesson_builder(cfg.lesson_builder) if cfg.lesson_builder else default_lesson
        self.train_with_lesson = LESSON_TRAINING[cfg.lesson_training]
        self.scrubs_total = 0
        self.lessons: dict[str, str] = {}  # the last step's lessons by prompt (saved with the checkpoint, inspectable)
        self.processed: torch.Tensor | None = None  # (groups,) bool: this step's processed groups
        self.metrics: dict = {}

    @property
    def active(self) -> bool:
        return self.mode.active

    # ---- checkpoint ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "store": None if self.store is None else self.store.state_dict(),
            "lessons": dict(self.lessons),
            "scrubs_total": self.scrubs_total,
        }

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            return
        if self.store is not None:
            self.store.load_state_dict(state["store"])
        self.lessons = dict(state["lessons"])
        self.scrubs_total = int(state["scrubs_total"])

    # ---- 1. rebuild ----------------------------------------------------------------------------------------------

    def rebuild(self, trainer, problems, rollout: Rollout, texts: list[str], rewards, step: int):
        """(rollout, texts, rewards) of the rebuilt groups (module doc); unchanged with ``off``."""
        if not self.active:
            return rollout, texts, rewards
        cfg, world, size = self.cfg, self.world, self.cfg.group_size
        n = len(problems)
        correct = rewards.correct.view(n, size)
        all_wrong = ~correct.any(dim=1)
        rng = random.Random(derived_seed(cfg.seed, "trajectories", step))  # the same draws on every rank
        if self.mode.outcome_blind:
            chosen = sorted(rng.sample(range(n), int(all_wrong.sum())))
        else:
            chosen = all_wrong.nonzero().flatten().tolist()
        local = world.rows(n)
        pad_id = trainer.tokenizer.pad_token_id
        original = rollout
        rollout = with_carrier(rollout)
        m = {"traj_all_wrong_groups": int(all_wrong.sum()), "traj_replayed_samples": 0, "traj_lesson_samples": 0}

        replayed = []
        if self.mode.replay:
            for g in chosen:
                entry = self.store.pick(problems[g].prompt, rng)
                if entry is None:
                    continue
                replayed.append(g)
                if local.start <= g < local.stop:
                    row = _group_rows(g, local.start, size)[-1]
                    rollout = replace_rows(rollout, [row], self._stored_row(rollout, row, entry), pad_id)
            m["traj_replayed_samples"] = len(replayed)

        lesson_groups = [g for g in chosen if g not in replayed] if self.mode.lessons else []
        if lesson_groups:
            rollout, lesson_metrics = self._lessons(
                trainer, problems, rollout, texts, correct, lesson_groups, rng, step
            )
            m.update(lesson_metrics)
            lesson_groups = lesson_metrics.pop("_groups")
        if self.mode.replay:
            self._store_candidates(trainer, problems, original, correct, step)

        texts = world.gather_list(rollout.texts)
        rewards = trainer.scorer(texts, problems, step)
        processed = torch.zeros(n, dtype=torch.bool)
        processed[replayed + lesson_groups] = True
        self.processed = processed
        totals = rewards.total.view(n, size)
        signal = totals.amax(dim=1) != totals.amin(dim=1)
        rescued = int((processed & all_wrong & signal).sum())
        m["traj_groups_processed"] = int(processed.sum())
        m["traj_groups_rescued"] = rescued
        m["traj_rescued_frac"] = rescued / m["traj_all_wrong_groups"] if m["traj_all_wrong_groups"] else 0.0
        m["traj_store_size"] = len(self.store) if self.store is not None else 0
        m["traj_lesson_scrubs_total"] = self.scrubs_total
        self.metrics = m
        return rollout, texts, rewards

    def _stored_row(self, rollout: Rollout, row: int, entry: StoredTrajectory) -> Rollout:
        """A one-row rollout: the prompt of ``row``, the stored completion, its behaviour log-probs."""
        ids = torch.tensor([entry.completion_ids], dtype=rollout.completion_ids.dtype)
        one = Rollout(
            rollout.prompt_ids[row : row + 1],
            rollout.prompt_mask[row : row + 1],
            ids.to(rollout.completion_ids.device),
            torch.ones_like(ids).to(rollout.completion_mask.device, rollout.completion_mask.dtype),
            torch.tensor([entry.truncated]),
            [entry.text],
        )
        return with_carrier(one, torch.tensor([entry.behaviour_logp], dtype=torch.float32))

    def lesson_for(self, trainer, problems, texts, correct, truncated, g: int, rng) -> tuple[str, str] | None:
        """(the lesson of group ``g``, the user message with it), scrubbed of the gold answer(s); None when no lesson
        fits in max_prompt_length. ``random_lesson``: built from another problem's group, scrubbed of both golds."""
        size, cfg = self.cfg.group_size, self.cfg
        src = g
        if self.mode.foreign_lesson:
            src = rng.choice([j for j in range(len(problems)) if j != g])
        span = slice(src * size, (src + 1) * size)
        try:
            lesson = self.builder(problems[src].prompt, texts[span], correct[src].tolist(), truncated[span])
        except Exception as exc:  # the user's code failed: say which setting, on which problem, and why
            if cfg.lesson_builder is None:
                raise
            raise ConfigFieldError(
                "lesson_builder",
                f"RLVRConfig.lesson_builder={cfg.lesson_builder!r} raised {type(exc).__name__}: {exc} (on the problem "
                f"{problems[src].prompt[:80]!r}); expected a function (prompt, texts, correct, truncated) -> str",
            ) from exc
        if not isinstance(lesson, str):
            raise ConfigFieldError(
                "lesson_builder",
                f"RLVRConfig.lesson_builder={cfg.lesson_builder!r}: expected a function returning a str, got "
                f"{type(lesson).__name__}",
            )
        golds = sorted({problems[g].answer, problems[src].answer})
        tok = trainer.tokenizer

        def tokens(message: str) -> int:
            return len(tok(chat_prompt(tok, message, cfg.system_prompt), add_special_tokens=False)["input_ids"])

        bare = tokens(problems[g].prompt)  # the prompt without a lesson (preflight: it fits)
        for _ in range(12):  # trim the lesson until the prompt fits
            lesson, scrubs = scrub_gold(lesson, golds)  # last, whoever built or trimmed it
            message = f"{problems[g].prompt}\n\n{lesson}"
            length = tokens(message)
            if length <= cfg.max_prompt_length:
                self.scrubs_total += scrubs
                return lesson, message
            # keep the share of the lesson that the room left fits (at most 2/3): a lesson many times too long
            # reaches the budget in a few rounds instead of being dropped
            room = max(cfg.max_prompt_length - bare, 0) / max(length - bare, 1)
            lesson = lesson[: int(len(lesson) * min(room, 2 / 3))]
            if not lesson.strip():
                return None
        return None

    def _lessons(self, trainer, problems, rollout, texts, correct, groups, rng, step):
        """Re-sample each lesson group of this rank (G completions, the lesson in the prompt) into ``rollout``."""
        cfg, world, size = self.cfg, self.world, self.cfg.group_size
        local = world.rows(len(problems))
        truncated = [bool(t) for t in world.gather_list(rollout.truncated.tolist())]
        built = {}
        for g in groups:  # every rank builds every lesson: the same draws, the same scrub counts
            lesson = self.lesson_for(trainer, problems, texts, correct, truncated, g, rng)
            if lesson is not None:
                built[g] = lesson
        self.lessons = {problems[g].prompt: lesson for g, (lesson, _) in built.items()}
        mine = [g for g in built if local.start <= g < local.stop]
        m = {"_groups": sorted(built), "traj_lesson_samples": len(built) * size}
        if not built:  # no lesson fits max_prompt_length: nothing to sample (every rank built the same: none)
            return rollout, {**m, "traj_hint_reliance": 0.0, "traj_prompt_tokens_added": 0}
        tok = trainer.tokenizer
        prompts = [chat_prompt(tok, built[g][1], cfg.system_prompt) for g in mine]
        filler = rollout.select(torch.tensor([0]))
        if not prompts and world.active:  # the same generate and forward calls on every rank
            prompts = [chat_prompt(tok, problems[local.start].prompt, cfg.system_prompt)]
        seed = derived_seed(cfg.seed, "lessons", step, *(("rank", world.rank) if world.active else ()))
        from rlvr_fast.trainer.update.finite_guard import rollout_of_step

        # charged to the step's generation and fixed log-prob parts, not to the scoring they run inside
        timer = trainer.timer
        with timer.part("generation"), trainer.policy.generation(), rollout_of_step(step):
            sampled = trainer.generator.generate(
                prompts,
                n=size,
                max_new_tokens=cfg.max_completion_length,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=seed,
            )
        rows = [r for g in mine for r in _group_rows(g, local.start, size)]
        if not mine:
            sampled = sampled.select(torch.tensor([], dtype=torch.long))
        idx = torch.tensor(rows, dtype=torch.long)
        bare = Rollout(  # the lesson's completions under the prompt without the lesson
            rollout.prompt_ids[idx],
            rollout.prompt_mask[idx],
            sampled.completion_ids,
            sampled.completion_mask,
            sampled.truncated,
            sampled.texts,
        )
        with timer.part("fixed_logprobs"):
            with_lesson = _logprobs(trainer, sampled, filler)
            without = _logprobs(trainer, bare, filler)
        mask = sampled.completion_mask.float()
        reliance_sum, tokens, added = world.sum(
            [
                ((with_lesson - without) * mask).sum(),
                mask.sum(),
                (sampled.prompt_mask.sum(dim=1) - bare.prompt_mask.sum(dim=1)).sum() if mine else 0.0,
            ]
        )
        m["traj_hint_reliance"] = reliance_sum / tokens if tokens else 0.0
        m["traj_prompt_tokens_added"] = added
        if mine:
            new = with_carrier(sampled) if self.train_with_lesson else with_carrier(bare, with_lesson)
            rollout = replace_rows(rollout, rows, new, tok.pad_token_id)
        return rollout, m

    def _store_candidates(self, trainer, problems, original: Rollout, correct, step: int) -> None:
        """This step's candidates (successes; ``uniform``: any completion), at most replay_capacity per group, with
        their sampling log-probs, gathered in rank order into every rank's store."""
        cfg, world, size = self.cfg, self.world, self.cfg.group_size
        local = world.rows(len(problems))
        picks: list[tuple[int, int]] = []  # (group, local row)
        for g in range(local.start, local.stop):
            rows = _group_rows(g, local.start, size)
            if self.mode.outcome_blind:
                # at most the group: a replay_capacity above group_size keeps several steps' draws per prompt
                draws = min(cfg.replay_capacity, size)
                chosen = sorted(random.Random(derived_seed(cfg.seed, "store", step, g)).sample(rows, draws))
            else:
                chosen = [r for i, r in enumerate(rows) if bool(correct[g, i])][: cfg.replay_capacity]
            picks += [(g, r) for r in chosen]
        if not world.sum([len(picks)])[0]:
            return
        ro = original.select(torch.tensor([r for _, r in picks], dtype=torch.long))
        logp = _logprobs(trainer, ro, original.select(torch.tensor([0])))
        items = []
        for i, (g, _) in enumerate(picks):
            length = int(ro.completion_mask[i].sum())
            items.append(
                (
                    problems[g].prompt,
                    StoredTrajectory(
                        ro.completion_ids[i, :length].tolist(),
                        logp[i, :length].tolist(),
                        ro.texts[i],
                        bool(ro.truncated[i]),
                        step,
                    ),
                )
            )
        self.store.extend(world.gather_list(items))

    # ---- 2. advantages ---------------------------------------------------------------------------------------------

    def shape_advantages(self, adv):
        """replay_positive_only: the processed groups' negative advantages set to 0 (``adv`` as is otherwise)."""
        if not self.active or not self.cfg.replay_positive_only or self.processed is None:
            return adv
        a = adv.advantages.view(len(self.processed), self.cfg.group_size).clone()
        a[self.processed] = a[self.processed].clamp(min=0)
        return replace(adv, advantages=a.view(adv.advantages.shape))

    # ---- 3. importance weights ---------------------------------------------------------------------------------------

    def weight_batch(self, trainer, batch, rollout: Rollout):
        """``batch`` with each off-policy row's mask multiplied by LUFFY's gradient coefficient (``weights``) and the
        carrier removed; the shaped weights' statistics into ``metrics``."""
        if not self.active:
            return batch
        carrier = batch.rollout.rollout_logprobs
        off = ~torch.isnan(carrier).any(dim=1) if carrier is not None else torch.zeros(0, dtype=torch.bool)
        bare = replace(batch.rollout, rollout_logprobs=None)
        batch = replace(batch, rollout=bare)
        if not self.world.sum([off.sum()])[0]:
            return batch
        rows = off.nonzero().flatten()
        sub = bare.select(rows)
        current = _logprobs(trainer, sub, replace(rollout.select(torch.tensor([0])), rollout_logprobs=None))
        mask = batch.loss_mask[rows]
        log_ratio = (current.to(carrier.device) - carrier[rows]) * (mask > 0)
        gamma = self.cfg.replay_gamma
        coeff = shaped_gradient_coefficient(log_ratio, gamma)
        f = shaped_weight(log_ratio, gamma)
        loss_mask = batch.loss_mask.clone()
        loss_mask[rows] = mask * coeff
        counted = mask > 0
        f_sum, c_sum, tokens = self.world.sum([(f * counted).sum(), (coeff * counted).sum(), counted.sum()])
        extremes = self.world.gather_list(
            [(float(f[counted].min()), float(f[counted].max()))] if bool(counted.any()) else []
        )
        self.metrics.update(
            {
                "traj_is_weight_mean": f_sum / tokens if tokens else 0.0,
                "traj_is_weight_min": min(e[0] for e in extremes) if extremes else 0.0,
                "traj_is_weight_max": max(e[1] for e in extremes) if extremes else 0.0,
                "traj_is_grad_coeff_mean": c_sum / tokens if tokens else 0.0,
                "traj_off_policy_rows": int(self.world.sum([len(rows)])[0]),
            }
        )
        return replace(batch, loss_mask=loss_mask)

    def step_metrics(self) -> dict:
        return dict(self.metrics) if self.active else {}
