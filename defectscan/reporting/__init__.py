"""Pictures and pages people look at: overlays and outcome previews, matplotlib figures, HTML from templates."""
