"""What the providers accept (API.md), in one place.

The manifest validates against these values and the simulator enforces them, so a model added
here is accepted by both at once.
"""

from __future__ import annotations

MODELS = (
    "kling-v1",
    "kling-v1-6",
    "kling-v2-master",
    "kling-v2-1-master",
    "kling-v2-5-turbo",
    "kling-v2-6",
    "kling-video-o1",
)
SIZES = ("1:1", "16:9", "9:16")
MODES = ("std", "pro")
DURATIONS = (5, 10)
SOUNDS = ("on", "off")
#: Kling caps prompts (and negative prompts) at this many characters.
MAX_PROMPT = 2500
