"""Draws docs/shapes_examples.png: the first 64 training images of the shapes world (32x32 preset) with captions.

    python docs/shapes_examples.py
"""

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from reed.image.shapes import render, world_indices  # noqa: E402

b = render(world_indices("train", 64), resolution=32)
fig, axs = plt.subplots(8, 8, figsize=(14, 17))
for i, ax in enumerate(axs.flat):
    ax.imshow(b.images[i], interpolation="nearest")
    ax.set_axis_off()
    ax.set_title("\n".join(textwrap.wrap(b.captions[i], 26)), fontsize=7.5)
fig.suptitle("shapes world (32x32 preset), training indices 0-63, seed 0: image and caption", fontsize=11)
fig.tight_layout(rect=(0, 0, 1, 0.975))
fig.savefig(Path(__file__).with_name("shapes_examples.png"), dpi=60)
