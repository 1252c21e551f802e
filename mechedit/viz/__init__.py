"""Figures from results: plotly only here, never in the core.

``heatmap`` draws any two axes of a ``Scores``; ``before_after`` draws an evaluation table;
``edge_graph`` draws an edge circuit; ``edit_bars`` compares several edits' reports row by row;
``write_report`` puts figures and tables into one standalone HTML file (plotly's JavaScript inline,
so it opens with no network).
"""

from mechedit.viz.edits import edit_bars
from mechedit.viz.figures import before_after, edge_graph, heatmap
from mechedit.viz.report import write_report

__all__ = ["before_after", "edge_graph", "edit_bars", "heatmap", "write_report"]
