"""Training curves: series reading, smoothing and the PNG sheet."""
import json

import numpy as np
import pytest
from PIL import Image

from world.curves import main, read_series, smooth


def test_smooth_is_a_trailing_moving_average():
    y = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(smooth(y, 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(smooth(y, 1), y)


def test_series_skip_lines_without_the_key_and_the_sheet_has_one_panel_each(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [{"nimg": 8, "a": 2.0}, {"nimg": 16, "b": 1.0},
                                                      {"nimg": 24, "a": 1.0}]))
    x, y = read_series(log, "a")
    assert x.tolist() == [8, 24] and y.tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="no values of 'c'"):
        read_series(log, "c")
    main(["--out", str(tmp_path / "c.png"), "--cols", "2", f"{log}:a", f"{log}:b:B loss", f"{log}:a"])
    assert Image.open(tmp_path / "c.png").size == (2 * 360, 2 * 220)
