"""The colours and inline styles the pool monitor's views draw with.

Colours are JupyterLab's CSS variables (``--jp-*``) with light fallbacks, so the views
follow the light and dark themes.
"""

from __future__ import annotations

# JupyterLab's theme variables, with the light theme's look where they are not defined
# (classic Notebook, nbconvert, GitHub).
TEXT = "var(--jp-content-font-color1, inherit)"
MUTED = "var(--jp-ui-font-color2, #6b7280)"
TRACK = "var(--jp-layout-color2, #e5e7eb)"  # an empty bar: dark in the dark theme
BORDER = "var(--jp-border-color2, #ddd)"
ERROR = "var(--jp-error-color1, #b91c1c)"
WARN = "var(--jp-warn-color1, #b45309)"
OCCUPANCY_COLOUR = "var(--jp-success-color1, #059669)"
BUSY_COLOUR = "var(--jp-brand-color1, #2563eb)"
LATENCY_COLOUR = "var(--jp-warn-color1, #d97706)"
JOINED_COLOUR = "var(--jp-success-color1, #059669)"
LEFT_COLOUR = "var(--jp-error-color1, #b91c1c)"
GREY = f"color:{MUTED}"
