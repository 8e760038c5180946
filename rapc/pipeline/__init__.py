"""The compress stage: schemes (which weights a layer keeps), ADMM (when), shrink (removal)."""
