"""Best-of-N panels: draft N seeds per scene, score the drafts as the challenge does, keep the best (step 04).

`render_storyboard(cfg, candidates=N)` (or `storyboard --candidates N`, or generate.candidates):

1. **Seeds.** Each scene's candidates are its own seed first, then N-1 seeds derived from it
   (`candidate_seeds`: a hash, so they never repeat the seeds 1..8 of the other scenes).
2. **Drafts.** Every (scene, seed) is rendered by the same renderer, from the prompts it encoded
   once, at `generate.draft_steps` (default: half the final steps) and `generate.draft_scale` times
   the final size (default 1.0: at another size the same seed draws other noise, so a smaller draft
   predicts its final less well). DiffSynth's pipeline draws one image per call, so seeds are not
   batched. Cost: N x scenes x draft_steps denoising steps (`draft_cost`), printed up front.
3. **Scores.** Step 05's `score_folder` on the drafts folder: the challenge's aesthetic score of
   every draft and its CLIP image embedding (the one step 05's style consistency uses).
4. **Objective**, for a draft d of scene s::

       value(d) = aesthetic(d) + consistency_weight * consistency(d)

   where consistency(d) is the mean cosine similarity of d to every draft of the *other* scenes.
   Each scene keeps its highest value (ties: the story's own seed, then the earlier candidate).
   The story's own seed is always a candidate, so the objective (mean value of the kept drafts)
   is never below the single-seed run's on the same draft settings.
5. **Finals** are rendered at full settings with the chosen seeds; the manifest records every
   candidate's seed and scores and the choice, so `reproduce` redraws the finals and a re-run
   with the same settings makes the same choices.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_lib.core.config import Config
from kolors_lib.core.errors import ConfigError, StoryError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from kolors_lib.kolors.renderer import KolorsRenderer
    from kolors_lib.kolors.story import RenderSettings

CANDIDATES_DIR = "candidates"  # inside cfg.storyboard_dir; step 05 scores only the folder's own files
OBJECTIVE = "aesthetic + consistency_weight * mean cosine to the other scenes' drafts; best per scene"
_SEED_RANGE = 2**32  # seeds every UI accepts


def candidate_seeds(seed: int, n: int) -> list[int]:
    """`seed` first, then n-1 seeds derived from it by a hash (stable across runs and machines)."""
    seeds = [seed]
    k = 1
    while len(seeds) < n:
        digest = hashlib.sha256(f"kolors-story:{seed}:{k}".encode()).digest()
        derived = int.from_bytes(digest[:8], "big") % _SEED_RANGE
        if derived not in seeds:
            seeds.append(derived)
        k += 1
    return seeds


@dataclass
class DraftBudget:
    """How the drafts are rendered and judged (validated before any model loads)."""

    candidates: int
    steps: int
    width: int
    height: int
    cfg_scale: float
    negative: str
    consistency_weight: float
    final_steps: int

    def cost(self, scenes: int) -> dict[str, int]:
        """Denoising steps of the drafts and of the finals (each step is 2 UNet passes: CFG)."""
        return {"drafts": self.candidates * scenes, "draft_steps": self.candidates * scenes * self.steps,
                "final_steps": scenes * self.final_steps}

    def cost_line(self, scenes: int) -> str:
        """The cost in one sentence, for the learner before the run starts."""
        c = self.cost(scenes)
        return (f"best of {self.candidates}: {self.candidates} x {scenes} scenes x {self.steps} draft steps = "
                f"{c['draft_steps']} draft steps ({self.width}x{self.height}), then {scenes} x {self.final_steps} "
                f"= {c['final_steps']} steps for the finals")


def _scaled(value: int, scale: float) -> int:
    from kolors_lib.core.checks import SIZE_MULTIPLE

    return max(SIZE_MULTIPLE, int(round(value * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def draft_budget(cfg: Config, settings: RenderSettings, candidates: int) -> DraftBudget:
    """The draft settings from cfg.generate and the final settings; ConfigError names a bad value."""
    gen = cfg.generate
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ConfigError(f"candidates must be an integer >= 1, not {candidates!r}")
    steps = gen.draft_steps or max(1, settings.steps // 2)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"generate.draft_steps must be a positive integer, not {gen.draft_steps!r}")
    if not isinstance(gen.draft_scale, (int, float)) or not 0 < gen.draft_scale <= 1:
        raise ConfigError(f"generate.draft_scale must be in (0, 1], not {gen.draft_scale!r}")
    weight = gen.consistency_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ConfigError(f"generate.consistency_weight must be a number >= 0, not {weight!r}")
    return DraftBudget(candidates, steps, _scaled(settings.width, gen.draft_scale),
                     _scaled(settings.height, gen.draft_scale), settings.cfg_scale, settings.negative,
                     float(weight), settings.steps)


@dataclass
class Candidate:
    """One draft: its seed, file and measures."""

    seed: int
    file: str
    score: float = 0.0
    consistency: float = 0.0
    value: float = 0.0


@dataclass
class Selection:
    """Every scene's candidates and the one kept, with the objective before and after."""

    plan: DraftBudget
    scenes: list[list[Candidate]]
    chosen: list[int]
    folder: Path
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        """The chosen seed of every scene."""
        return [cands[i].seed for cands, i in zip(self.scenes, self.chosen, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `selection` entry (floats rounded as step 05 writes them)."""
        from kolors_lib.score.scoring import round_score

        return {
            "candidates": self.plan.candidates, "objective": OBJECTIVE,
            "consistency_weight": self.plan.consistency_weight,
            "draft": {"steps": self.plan.steps, "width": self.plan.width, "height": self.plan.height,
                      "cfg_scale": self.plan.cfg_scale, "negative": self.plan.negative, "folder": self.folder.name},
            "cost": self.plan.cost(len(self.scenes)),
            "scenes": [{"index": s, "story_seed": cands[0].seed, "chosen_seed": cands[i].seed, "chosen": i,
                        "candidates": [{"seed": c.seed, "file": c.file, "score": round_score(c.score),
                                        "consistency": round_score(c.consistency), "value": round_score(c.value)}
                                       for c in cands]}
                       for s, (cands, i) in enumerate(zip(self.scenes, self.chosen, strict=True))],
            **{k: {m: round_score(v) for m, v in d.items()} for k, d in self.summary.items()},
        }


def render_drafts(renderer: KolorsRenderer, prompts: Sequence[str], seeds: Sequence[int], plan: DraftBudget,
                  folder: Path, progress: bool = True) -> list[list[Candidate]]:
    """Render every candidate seed of every scene into `folder` (emptied first); prompts must be encoded."""
    from kolors_lib.core.console import progress as tqdm
    from kolors_lib.kolors.renderer import save_png

    shutil.rmtree(folder, ignore_errors=True)  # stale drafts would be scored with the new ones
    folder.mkdir(parents=True)
    scenes = [[Candidate(seed, f"scene{s + 1:02d}_seed{seed}.png") for seed in candidate_seeds(story_seed,
                                                                                                  plan.candidates)]
              for s, story_seed in enumerate(seeds)]
    with tqdm(total=plan.candidates * len(prompts), desc=f"drafts (best of {plan.candidates})", unit="draft",
              disable=not progress) as bar:
        for prompt, cands in zip(prompts, scenes, strict=True):
            for cand in cands:
                image = renderer.render(prompt, plan.negative, cand.seed, plan.steps, plan.cfg_scale, plan.width,
                                        plan.height)
                save_png(image, folder / cand.file)
                bar.update()
    return scenes


def _similarity(embeddings: list[Any]) -> Any:
    """Cosine similarities of the embeddings (float64, as step 05 computes them)."""
    import torch

    e = torch.stack(list(embeddings)).double()
    e = e / e.norm(dim=-1, keepdim=True)
    return e @ e.T


def judge(scenes: list[list[Candidate]], scores: dict[str, float], embeddings: dict[str, Any],
          weight: float) -> list[int]:
    """Fill each candidate's score, consistency and value; return the index kept per scene."""
    flat = [(s, c) for s, cands in enumerate(scenes) for c in cands]
    sim = _similarity([embeddings[c.file] for _, c in flat])
    owner = [s for s, _ in flat]
    for i, (s, cand) in enumerate(flat):
        others = [j for j, t in enumerate(owner) if t != s]
        cand.score = float(scores[cand.file])
        cand.consistency = float(sim[i, others].mean()) if others else 0.0
        cand.value = cand.score + weight * cand.consistency
    # ties: the story's own seed (index 0), then the earlier candidate
    return [max(range(len(cands)), key=lambda k, cs=cands: (cs[k].value, k == 0, -k)) for cands in scenes]


def _summary(scenes: list[list[Candidate]], picks: list[int], embeddings: dict[str, Any]) -> dict[str, float]:
    """Mean aesthetic score, step 05's consistency (mean pairwise cosine) and the objective of one pick."""
    from kolors_lib.score.scoring import style_consistency

    kept = [cands[k] for cands, k in zip(scenes, picks, strict=True)]
    consistency, _, _ = style_consistency({c.file: embeddings[c.file] for c in kept})
    return {"mean_score": sum(c.score for c in kept) / len(kept), "consistency": consistency or 0.0,
            "objective": sum(c.value for c in kept) / len(kept)}


def choose_seeds(cfg: Config, renderer: KolorsRenderer, prompts: Sequence[str], seeds: Sequence[int],
                 plan: DraftBudget, progress: bool = True) -> Selection:
    """Draft, score and choose one seed per scene (see the module's docstring for the objective)."""
    from kolors_lib.score.scoring import score_folder

    folder = cfg.storyboard_dir / CANDIDATES_DIR
    scenes = render_drafts(renderer, prompts, seeds, plan, folder, progress)
    result = score_folder(cfg, folder, write=False)
    chosen = judge(scenes, result.scores, result.embeddings, plan.consistency_weight)
    summary = {"story_seeds": _summary(scenes, [0] * len(scenes), result.embeddings),
               "chosen_seeds": _summary(scenes, chosen, result.embeddings)}
    return Selection(plan, scenes, chosen, folder, summary)


def candidate_grid(manifest_path: str | Path, thumb: float = 1.6) -> Figure:
    """Scenes (rows) x candidate seeds (columns) with their scores; the chosen draft framed in red."""
    import json

    import numpy as np
    from matplotlib.figure import Figure
    from PIL import Image

    manifest_path = Path(manifest_path)
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    sel = data.get("selection")
    if not sel:
        raise StoryError(f"{manifest_path}: no best-of-N selection (render with candidates > 1)")
    folder = manifest_path.parent / sel["draft"]["folder"]
    rows, cols = len(sel["scenes"]), sel["candidates"]
    fig = Figure(figsize=(cols * thumb + 0.6, rows * (thumb + 0.3) + 0.6), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for scene, row in zip(sel["scenes"], axes, strict=True):
        for k, (cand, ax) in enumerate(zip(scene["candidates"], row, strict=True)):
            with Image.open(folder / cand["file"]) as img:
                ax.imshow(np.asarray(img.convert("RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            own = " (story)" if k == 0 else ""
            ax.set_title(f"seed {cand['seed']}{own}\n{cand['score']:.2f} | {cand['consistency']:.3f}", fontsize=7)
            chosen = k == scene["chosen"]
            for spine in ax.spines.values():
                spine.set_visible(chosen)
                spine.set_edgecolor("red")
                spine.set_linewidth(3)
        row[0].set_ylabel(f"{scene['index'] + 1:02d}", rotation=0, labelpad=12)
    before, after = sel["story_seeds"], sel["chosen_seeds"]
    fig.suptitle(f"best of {cols} (each: score | consistency), story seeds -> chosen:\n"
                 f"mean score {before['mean_score']:.2f} -> {after['mean_score']:.2f}, "
                 f"consistency {before['consistency']:.3f} -> {after['consistency']:.3f}", fontsize=8)
    fig.tight_layout()
    return fig


__all__ = ["CANDIDATES_DIR", "Candidate", "DraftBudget", "Selection", "candidate_grid", "candidate_seeds",
           "choose_seeds", "draft_budget", "judge", "render_drafts"]
