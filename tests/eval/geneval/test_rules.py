"""GenEval's rules on hand-made detections: filtering, IoU, relative position, and evaluate() for every tag."""
from __future__ import annotations

import json

import numpy as np
import pytest

from eval.geneval.rules import (
    COLORS,
    Detection,
    ScoringOptions,
    compute_iou,
    details_json,
    evaluate,
    rank_detections,
    relative_position,
    select_detections,
)
from tests.conftest import shared_file


def det(box=(0, 0, 10, 10), score=0.9, color=None) -> Detection:
    return Detection(tuple(float(v) for v in box), score, color=color)


def filter_detections(detections, threshold, max_objects=16, max_overlap=1.0):
    """Upstream's whole post-filter on a detector's output: rank, then select."""
    return select_detections(rank_detections(detections, threshold, max_objects), threshold, max_objects,
                             max_overlap)


# --- rank_detections / select_detections ---------------------------------------------------------------------------

def test_threshold_is_strict_and_counting_has_its_own():
    dets = {"cat": [det(score=0.3), det(score=0.31), det(score=0.95), det(score=0.9)]}
    assert [d.score for d in filter_detections(dets, 0.3)["cat"]] == [0.95, 0.9, 0.31]
    assert [d.score for d in filter_detections(dets, 0.9)["cat"]] == [0.95]
    options = ScoringOptions()
    assert options.threshold_for("counting") == 0.9
    assert all(options.threshold_for(t) == 0.3 for t in ("single_object", "two_object", "colors", "position",
                                                         "color_attr"))


def test_sorted_by_score_capped_at_16_and_empty_classes_absent():
    scores = np.random.default_rng(0).uniform(0.4, 1.0, 20).tolist()
    kept = filter_detections({"cat": [det(score=s) for s in scores], "dog": [det(score=0.1)]}, 0.3)
    assert list(kept) == ["cat"]
    assert [d.score for d in kept["cat"]] == sorted(scores, reverse=True)[:16]
    assert len(filter_detections({"cat": [det(score=s) for s in scores]}, 0.3, max_objects=3)["cat"]) == 3


def test_tied_scores_keep_the_later_detection_first_like_argsort_reversed():
    a, b, c = det((0, 0, 1, 1), 0.5), det((2, 2, 3, 3), 0.5), det((4, 4, 5, 5), 0.7)
    assert filter_detections({"cat": [a, b, c]}, 0.3)["cat"] == [c, b, a]
    assert np.argsort([0.5, 0.5, 0.7])[::-1].tolist() == [2, 1, 0]  # upstream's expression on a small array


def test_scores_tie_and_pass_the_threshold_in_float32_like_upstreams_arrays():
    a, b = det((0, 0, 1, 1), 0.8), det((2, 2, 3, 3), 0.80000001)  # distinct in float64, equal in float32
    assert rank_detections({"cat": [a, b]}, 0.3)["cat"] == [b, a]
    assert rank_detections({"cat": [b, a]}, 0.3)["cat"] == [a, b]
    at_threshold = float(np.float32(0.3))  # 0.30000001192…: above 0.3 in float64, equal to it in float32
    assert rank_detections({"cat": [det(score=at_threshold)]}, 0.3) == {}
    assert select_detections({"cat": [det(score=at_threshold)]}, 0.3) == {}


def test_selection_keeps_the_ranked_order_of_ties_and_refuses_unranked_lists():
    red, blue = det((0, 0, 1, 1), 0.5, "red"), det((2, 2, 3, 3), 0.5, "blue")
    ranked = rank_detections({"cat": [red, blue]}, 0.3)
    assert ranked["cat"] == [blue, red]
    assert select_detections(ranked, 0.3)["cat"] == [blue, red]  # a second sort would give [red, blue]
    assert select_detections(select_detections(ranked, 0.3), 0.3)["cat"] == [blue, red]
    with pytest.raises(ValueError, match="descending score order"):
        select_detections({"cat": [det(score=0.4), det(score=0.6)]}, 0.3)


def test_nms_is_off_by_default_and_uses_plus_one_areas_when_on():
    dup = [det((0, 0, 9, 9), 0.9), det((0, 0, 9, 9), 0.8), det((0, 0, 9, 4), 0.7), det((0, 0, 9, 3), 0.6)]
    assert len(filter_detections({"cat": dup}, 0.3)["cat"]) == 4
    kept = filter_detections({"cat": dup}, 0.3, max_overlap=0.5)["cat"]
    assert [d.score for d in kept] == [0.9, 0.6]  # IoU 1 and 50/100 = 0.5 removed (>=), 40/100 kept


# --- compute_iou ---------------------------------------------------------------------------------------------------

def test_iou_cases():
    assert compute_iou([0, 0, 9, 9], [0, 0, 9, 9]) == 1
    assert compute_iou([0, 0, 9, 9], [20, 20, 29, 29]) == 0
    assert compute_iou([0, 0, 9, 9], [10, 0, 19, 9]) == 0  # touching: inter width max(9 - 10 + 1, 0)
    assert compute_iou([0, 0, 9, 9], [5, 0, 14, 9]) == pytest.approx(50 / 150)
    assert compute_iou([0, 0, -1, -1], [0, 0, -1, -1]) == 0  # empty union


# --- relative_position ---------------------------------------------------------------------------------------------

def test_the_four_relations_with_y_growing_downwards():
    b = (50, 50, 60, 60)
    assert relative_position((0, 50, 10, 60), b) == {"left of"}
    assert relative_position((100, 50, 110, 60), b) == {"right of"}
    assert relative_position((50, 0, 60, 10), b) == {"above"}
    assert relative_position((50, 100, 60, 110), b) == {"below"}


def test_close_centres_give_no_relation_and_zero_offset_no_error():
    assert relative_position((0, 0, 10, 10), (1, 1, 11, 11)) == set()
    with np.errstate(all="raise"):
        assert relative_position((0, 0, 10, 10), (0, 0, 10, 10)) == set()


def test_a_clear_diagonal_holds_two_relations():
    assert relative_position((100, 100, 110, 110), (0, 0, 10, 10)) == {"right of", "below"}
    assert relative_position((0, 100, 10, 110), (100, 0, 110, 10)) == {"left of", "below"}


def test_the_shrink_by_both_dimensions_flips_a_marginal_case():
    a, b = (25, 0, 125, 10), (0, 0, 100, 10)  # centres 25 apart, widths 100 + 100
    assert relative_position(a, b, c=0.0) == {"right of"}
    assert relative_position(a, b, c=0.1) == set()  # (25 - 20) / 25 = 0.2


def test_division_is_by_the_original_offset_norm():
    b, a = (0, 0, 20, 49.5), (10, 10, 30, 59.5)  # offset (10, 10); revised (6, 0.1)
    assert relative_position(a, b) == set()  # 6 / 14.14 = 0.42; dividing by |revised| would say "right of"


def test_position_is_decided_in_float32_on_the_half_boundary():
    """Whole-pixel boxes whose dy is 0.50000002 in float64 and exactly 0.5 in float32 (upstream's box dtype):
    centres (1466, 1495) and (709.5, 1004.5), offset (756.5, 490.5), revised dy 490.5 - 0.1 · 397 = 450.8 over
    the norm 901.6. Upstream finds no "below"; float64 arithmetic would."""
    a, b = (1373, 1300, 1559, 1690), (235, 1001, 1184, 1008)
    assert relative_position(a, b) == {"right of"}
    assert relative_position(b, a) == {"left of"}
    meta = record("position", [{"class": "cat", "count": 1},
                               {"class": "dog", "count": 1, "position": ["below", 0]}])
    assert evaluate({"cat": [det(b)], "dog": [det(a)]}, meta) == (False, "expected dog below target, found right "
                                                                          "of target")


# --- evaluate ------------------------------------------------------------------------------------------------------

def record(tag, include, exclude=None):
    meta = {"tag": tag, "include": include, "prompt": "p"}
    if exclude:
        meta["exclude"] = exclude
    return meta


def test_single_and_two_object_and_no_detections():
    one = record("single_object", [{"class": "cat", "count": 1}])
    assert evaluate({"cat": [det()]}, one) == (True, "")
    assert evaluate({}, one) == (False, "expected cat>=1, found 0")
    two = record("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    assert evaluate({"cat": [det()], "dog": [det()], "cup": [det()]}, two) == (True, "")  # extras are fine
    assert evaluate({}, two) == (False, "expected cat>=1, found 0\nexpected dog>=1, found 0")


def test_counting_exact_via_include_and_exclude():
    meta = record("counting", [{"class": "clock", "count": 2}], [{"class": "clock", "count": 3}])
    assert evaluate({"clock": [det(), det()]}, meta) == (True, "")
    assert evaluate({"clock": [det()] * 3}, meta) == (False, "expected clock<3, found 3")
    assert evaluate({"clock": [det()]}, meta) == (False, "expected clock>=2, found 1")


def test_exclude_counts_the_whole_filtered_list_not_the_top_count():
    meta = record("counting", [{"class": "clock", "count": 2}], [{"class": "clock", "count": 3}])
    assert evaluate({"clock": [det()] * 5}, meta) == (False, "expected clock<3, found 5")


def test_colour_is_checked_on_the_top_count_objects_only():
    meta = record("colors", [{"class": "cat", "count": 1, "color": "red"}])
    assert evaluate({"cat": [det(score=0.9, color="red"), det(score=0.8, color="blue")]}, meta) == (True, "")
    assert evaluate({"cat": [det(score=0.9, color="blue"), det(score=0.8, color="red")]}, meta) == (
        False, "expected red cat>=1, found 0 red; and 1 blue")


def test_colour_reason_lists_colours_in_color_order():
    meta = record("colors", [{"class": "cat", "count": 2, "color": "blue"}])
    ok, reason = evaluate({"cat": [det(color="white"), det(color="red")]}, meta)
    assert not ok and reason == "expected blue cat>=2, found 0 blue; and 1 red, 1 white"


def test_tied_scores_decide_which_object_is_coloured():
    tied = filter_detections({"cat": [det(score=0.5, color="red"), det(score=0.5, color="blue")]}, 0.3)
    red = record("colors", [{"class": "cat", "count": 1, "color": "red"}])
    blue = record("colors", [{"class": "cat", "count": 1, "color": "blue"}])
    assert evaluate(tied, red)[0] is False  # the later of two tied detections is the top one
    assert evaluate(tied, blue) == (True, "")


def test_color_attr_needs_each_class_in_its_own_colour():
    meta = record("color_attr", [{"class": "bus", "count": 1, "color": "green"},
                                 {"class": "microwave", "count": 1, "color": "purple"}])
    assert evaluate({"bus": [det(color="green")], "microwave": [det(color="purple")]}, meta) == (True, "")
    ok, reason = evaluate({"bus": [det(color="purple")], "microwave": [det(color="green")]}, meta)
    assert not ok and reason.count("\n") == 1


POSITION = record("position", [{"class": "teddy bear", "count": 1},
                               {"class": "dog", "count": 1, "position": ["right of", 0]}])


def test_position_correct_wrong_and_no_target():
    bear = det((0, 0, 10, 10))
    assert evaluate({"teddy bear": [bear], "dog": [det((50, 0, 60, 10))]}, POSITION) == (True, "")
    assert evaluate({"teddy bear": [bear], "dog": [det((-60, 0, -50, 10))]}, POSITION) == (
        False, "expected dog right of target, found left of target")
    assert evaluate({"teddy bear": [bear], "dog": [det((0, 0, 10, 10))]}, POSITION) == (
        False, "expected dog right of target, found  target")  # upstream joins an empty set
    assert evaluate({"dog": [det((50, 0, 60, 10))]}, POSITION) == (
        False, "expected teddy bear>=1, found 0\nno target for dog to be right of")


def test_position_uses_the_top_object_of_each_class_and_accepts_diagonals():
    bears = [det((0, 0, 10, 10), 0.9), det((200, 0, 210, 10), 0.5)]  # only the first is the target
    assert evaluate({"teddy bear": bears, "dog": [det((50, 50, 60, 60))]}, POSITION)[0] is True
    below = record("position", [{"class": "teddy bear", "count": 1},
                                {"class": "dog", "count": 1, "position": ["below", 0]}])
    assert evaluate({"teddy bear": bears, "dog": [det((50, 50, 60, 60))]}, below)[0] is True


def test_a_failed_colour_skips_the_position_check():
    meta = record("position", [{"class": "cat", "count": 1},
                               {"class": "dog", "count": 1, "color": "red", "position": ["right of", 0]}])
    ok, reason = evaluate({"cat": [det((0, 0, 10, 10))], "dog": [det((-60, 0, -50, 10), color="blue")]}, meta)
    assert not ok and reason == "expected red dog>=1, found 0 red; and 1 blue"


def test_a_missing_colour_is_an_error_not_a_wrong_answer():
    meta = record("colors", [{"class": "cat", "count": 1, "color": "red"}])
    with pytest.raises(ValueError, match="no colour"):
        evaluate({"cat": [det()]}, meta)


def test_official_records_parse_and_score():
    lines = shared_file("geneval/evaluation_metadata.jsonl").read_text().splitlines()
    position = next(r for r in map(json.loads, lines) if r["tag"] == "position")
    assert isinstance(position["include"][1]["position"], list)
    ref, other = position["include"][0]["class"], position["include"][1]["class"]
    relation = position["include"][1]["position"][0]
    offsets = {"left of": (-100, 0), "right of": (100, 0), "above": (0, -100), "below": (0, 100)}[relation]
    box = (200 + offsets[0], 200 + offsets[1], 210 + offsets[0], 210 + offsets[1])
    assert evaluate({ref: [det((200, 200, 210, 210))], other: [det(box)]}, position) == (True, "")


# --- options and output format -------------------------------------------------------------------------------------

def test_options_parse_like_the_official_key_value_pairs():
    options = ScoringOptions.from_pairs(["threshold=0.5", "crop=0", "max_objects=4", "bgcolor=original"])
    assert (options.threshold, options.crop, options.max_objects, options.bgcolor) == (0.5, False, 4, "original")
    assert ScoringOptions.from_pairs([]) == ScoringOptions() and ScoringOptions().colors == COLORS
    with pytest.raises(ValueError, match="--detector-path"):
        ScoringOptions.from_pairs(["model=foo"])
    with pytest.raises(ValueError, match="not a valid threshold"):
        ScoringOptions.from_pairs(["threshold=high"])


def test_details_are_a_json_string_of_box_and_score_lists():
    details = json.loads(details_json({"cat": [det((1, 2, 3, 4), 0.5)]}))
    assert details == {"cat": [[1.0, 2.0, 3.0, 4.0, 0.5]]}
