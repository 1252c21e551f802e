"""Figures from results: plotly only here, never in the core.

``heatmap`` draws any two axes of a ``Scores`` (``mark=`` outlines selected components); ``before_after`` draws an evaluation table;
``edge_graph`` draws an edge circuit; ``probe_curves`` linear probes' accuracy by depth;
``agreement_heatmaps`` and ``recovery_bars`` whether several localisations agree and find a planted layer; ``partition_heatmap``, ``bias_bars`` and ``bias_history``
draw a bias edit (where its partitions sit, the bias against 50 %); ``edit_bars`` compares
several edits' reports row by row, ``comparison_bars`` one case edited through several
localisations; ``effect_scatter`` each neuron's predicted (attribution) vs observed effect of
zeroing it, and all selected together; ``k_sweep_lines`` top-k vs random-k zeroing against k;
``exposure_strip`` per-secret exposure before and after a privacy edit; ``write_report`` puts figures and tables into one standalone
HTML file (plotly's JavaScript inline, so it opens with no network); ``write_run_report`` writes
that page for a ``mechedit run`` folder. ``neuron_explorer`` is a notebook panel (ipywidgets) that
locates a fact's neurons and shows one neuron's detail; its computation is plain functions
(``fact_prompt_set``, ``text_prompt_set``, ``locate_neurons``, ``neuron_detail``, whose
``NeuronDetail.figure()`` draws a neuron's activation and attribution per prompt).
"""

from mechedit.viz.agreement import agreement_heatmaps, recovery_bars
from mechedit.viz.bias import bias_bars, bias_history, partition_heatmap
from mechedit.viz.edits import comparison_bars, edit_bars, relation_bars
from mechedit.viz.effects import effect_scatter, exposure_strip, k_sweep_lines
from mechedit.viz.explorer import (
    fact_prompt_set,
    locate_neurons,
    neuron_detail,
    neuron_explorer,
    text_prompt_set,
)
from mechedit.viz.figures import before_after, edge_graph, heatmap, probe_curves
from mechedit.viz.notebook import notebook_setup
from mechedit.viz.report import write_report
from mechedit.viz.run_report import write_run_report

__all__ = [
    "agreement_heatmaps",
    "before_after",
    "bias_bars",
    "bias_history",
    "comparison_bars",
    "edge_graph",
    "edit_bars",
    "effect_scatter",
    "exposure_strip",
    "fact_prompt_set",
    "heatmap",
    "k_sweep_lines",
    "locate_neurons",
    "neuron_detail",
    "neuron_explorer",
    "notebook_setup",
    "partition_heatmap",
    "probe_curves",
    "recovery_bars",
    "relation_bars",
    "text_prompt_set",
    "write_report",
    "write_run_report",
]
