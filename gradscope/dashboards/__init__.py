"""TensorBoard dashboards laid out from the questions a person asks of a run.

``charts``: the charts, their order and tags, and the custom-scalars layout;
``selection``: which layers a chart names; ``runs``: one writer per run (the
series TensorBoard colours apart); ``heatmaps``: heatmap images drawn off the
training thread.  ``gradscope.tensorboard.DashboardWriter`` puts them together.
"""
