"""A picture of calibration: teacher vs student role maps overlaid on the image (PNG).

One figure per image: one row per triplet (up to ``max_triplets``); columns are the image, then
teacher and student maps of subject, predicate and object, each upsampled and overlaid on the
image with a colour map. Titles name the prompt and role.
"""

from __future__ import annotations

import os
from typing import List, Sequence

import torch
import torch.nn.functional as F

from spade.utils.io import atomic_write

__all__ = ["draw_calibration_maps", "draw_dataset_examples"]

ROLES = ("subject", "predicate", "object")


def draw_calibration_maps(
    path: str,
    image: torch.Tensor,
    prompts: Sequence[str],
    teacher_maps: torch.Tensor,
    student_maps: torch.Tensor,
    max_triplets: int = 4,
) -> str:
    """Write the teacher / student overlay figure of one image to ``path`` (atomically).

    Args:
        image: float [3, S, S] in [0, 1].
        prompts: T prompts.
        teacher_maps, student_maps: [T, 3, R, R].
        max_triplets: rows drawn.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if teacher_maps.shape != student_maps.shape or teacher_maps.shape[0] != len(prompts):
        raise ValueError(
            f"{path}: {len(prompts)} prompts, teacher maps {tuple(teacher_maps.shape)}, student "
            f"maps {tuple(student_maps.shape)}"
        )
    rows = max(1, min(len(prompts), max_triplets))
    size = image.shape[-2:]
    img = image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()

    def up(m: torch.Tensor):
        m = F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)
        m = m[0, 0]
        return ((m - m.min()) / (m.max() - m.min() + 1e-8)).cpu().numpy()

    fig, axes = plt.subplots(rows, 7, figsize=(14, 2.2 * rows), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(prompts[r] if r < len(prompts) else "(no triplet)", fontsize=7)
        for k, role in enumerate(ROLES):
            for j, (who, maps) in enumerate((("teacher", teacher_maps), ("student", student_maps))):
                ax = axes[r, 1 + 2 * k + j]
                ax.imshow(img)
                if r < len(prompts):
                    ax.imshow(up(maps[r, k].detach()), cmap="jet", alpha=0.5)
                ax.set_title(f"{who}: {role}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return path


def draw_dataset_examples(trainer, out_dir: str, num_images: int) -> List[str]:
    """Draw the first ``num_images`` held-out (else training) images of a CalibrationTrainer."""
    items = [it for it in (trainer.eval_items or trainer.train_items) if it[1]][:num_images]
    model = trainer.calibration_model
    written = []
    with torch.no_grad():
        for record, triplets in items:
            image, teacher, _ = trainer.cache.lookup(record, triplets)
            if teacher is None:
                teacher = trainer.cache.get(record, triplets)
            student = model.student_maps(image[None].to(model.device), [triplets]).cpu()
            name = "".join(c if c.isalnum() else "_" for c in str(record["image_id"]))
            written.append(
                draw_calibration_maps(
                    os.path.join(out_dir, f"calibration_maps_{name}.png"),
                    image,
                    model.teacher.prompts(triplets),
                    teacher,
                    student,
                )
            )
    return written
