"""Pick the best epoch: epoch x weight grids of a run, and its epochs ranked by validation loss."""
from .ranking import EpochRow, Ranking, rank_epochs, ranking_from_record, table_text
from .runs import EpochFile, RunInfo, open_run, trigger_word

__all__ = ["EpochRow", "Ranking", "rank_epochs", "ranking_from_record", "table_text", "EpochFile", "RunInfo",
           "open_run", "trigger_word", "compare_grid", "save_compare_grid", "CompareGrid"]


def __getattr__(name):
    # the grid imports the sampling pipeline (diffusers); load it only when asked for
    if name in ("compare_grid", "save_compare_grid", "CompareGrid", "DEFAULT_WEIGHTS"):
        from . import grid
        return getattr(grid, name)
    raise AttributeError(name)
