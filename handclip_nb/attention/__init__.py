"""Cross-attention of PromptSG runs, in one place: the maps and their summary (:mod:`.source`),
static heatmap figures (:mod:`.figures`) and the ipywidgets explorer with its static fallback
(:mod:`.explorer`; ipywidgets is imported only when a person is present)."""
from .explorer import AttentionExplorer, explore
from .figures import AttentionSource, Match
from .source import (ModelAttentionSource, attention_maps, attention_record, attention_summary,
                     gallery_relation)

__all__ = ["AttentionExplorer", "explore", "AttentionSource", "Match", "ModelAttentionSource",
           "attention_maps", "attention_record", "attention_summary", "gallery_relation"]
