"""T2I-CompBench scoring arithmetic (taca.eval.rules) against hand-worked cases.

Every expected number below is worked out by hand from the official scripts' formulas
(Karine-Huang/T2I-CompBench @1b70949, see ../shared/reference/t2i-compbench.md), not by calling
the code under test.
"""
import numpy as np
import pytest

from taca.eval import rules
from taca.eval.layout import PROMPTS_DIR, read_lines
from taca.eval.parse import RuleParser, blip_questions, complex_objects, drop_adjectives, first_last_nouns, pre_question

D = rules.Detections


# 2D position ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", ["next to", "near", "on side of"])
def test_2d_near_branch(rel):
    a = [0, 0, 10, 10]                                                   # center (5, 5)
    assert rules.position_score_2d(rel, a, [100, 300, 110, 310]) == 1.0    # dx = 100 < 150
    assert rules.position_score_2d(rel, a, [300, 400, 310, 410]) == pytest.approx(150 / 400)  # dx 300, dy 400


def test_2d_left_right_branches():
    a, right_of_a = [0, 0, 10, 10], [100, 20, 110, 30]                 # dx = 100, dy = 20
    assert rules.position_score_2d("on the left of", a, right_of_a) == 1.0
    assert rules.position_score_2d("on the right of", a, right_of_a) == 0.0
    assert rules.position_score_2d("on the right of", right_of_a, a) == 1.0
    # |dy| > |dx|: not a left/right relation
    assert rules.position_score_2d("on the left of", a, [20, 200, 30, 210]) == 0.0
    # overlap: IoU = 5000 / 15000 = 1/3 >= 0.1 -> 0.1 / IoU = 0.3
    assert rules.position_score_2d("on the left of", [0, 0, 100, 100], [50, 0, 150, 100]) == pytest.approx(0.3)
    assert rules.position_score_2d("on the right of", [50, 0, 150, 100], [0, 0, 100, 100]) == pytest.approx(0.3)


def test_2d_top_bottom_branches():
    a, below = [0, 0, 10, 10], [0, 200, 10, 210]                         # dy = +200 (image y grows down)
    assert rules.position_score_2d("on the top of", a, below) == 1.0     # the official sign convention
    assert rules.position_score_2d("on the bottom of", a, below) == 0.0
    assert rules.position_score_2d("on the bottom of", below, a) == 1.0
    # overlap IoU = 1/3 vertically -> 0.3
    assert rules.position_score_2d("on the top of", [0, 0, 100, 100], [0, 50, 100, 150]) == pytest.approx(0.3)


def test_2d_other_relations_score_zero():
    a, b = [0, 0, 10, 10], [0, 200, 10, 210]
    assert rules.position_score_2d("on top of", a, b) == 0.0
    assert rules.position_score_2d(None, a, b) == 0.0


def test_relation_list_order():
    # "on the top of" is tried before "on top of"; "next to" before "near"
    assert rules.find_relation("a cat on the top of a dog", rules.SPATIAL_2D_RELATIONS) == "on the top of"
    assert rules.find_relation("a cat on top of a dog", rules.SPATIAL_2D_RELATIONS) == "on top of"
    assert rules.find_relation("a cat next to a dog near a tree", rules.SPATIAL_2D_RELATIONS) == "next to"
    assert rules.find_relation("a cat hidden behind a dog", rules.SPATIAL_3D_RELATIONS) == "behind"


def test_2d_image_score_and_cutoff():
    prompt = "a girl on the left of a dog"
    det = D(["person", "dog", "dog"], [[0, 0, 10, 10], [100, 0, 110, 10], [500, 0, 510, 10]], [0.9, 0.8, 0.7])
    r = rules.spatial2d_score(prompt, "girl", "dog", det)
    assert (r.obj1, r.idx1, r.idx2) == ("person", 0, 1)                  # girl -> person, first dog
    assert r.score == pytest.approx(0.25 * 0.9 + 0.25 * 0.8 + 0.5 * 1.0)
    # relation wrong -> 0.425 < 0.5 -> 0
    r = rules.spatial2d_score("a girl on the right of a dog", "girl", "dog", det)
    assert r.position == 0.0 and r.score == 0.0
    # one object only: 0.25 * 0.9 < 0.5 -> 0
    assert rules.spatial2d_score(prompt, "girl", "cat", det).score == 0.0
    # exact matching: "wild bird" is not "bird" in 2D
    det2 = D(["wild bird", "cat"], [[0, 0, 10, 10], [100, 0, 110, 10]], [0.99, 0.99])
    r = rules.spatial2d_score("a bird on the left of a cat", "bird", "cat", det2)
    assert r.idx1 is None and r.score == 0.0


# 3D ---------------------------------------------------------------------------------------------
def _depth():
    d = np.zeros((100, 100), np.float32)
    d[0:10, :] = 1.0          # first 10 rows
    return d


def test_3d_transposed_depth_and_partial_overlap():
    a, b = [0, 0, 20, 20], [10, 0, 30, 20]      # IoU = 200 / 600 = 1/3
    # transposed: A = d[0:20, 0:20] (mean 0.5), B = d[10:30, 0:20] (mean 0) -> diff 0.5 > 0
    s, diff = rules.position_score_3d("in front of", a, b, _depth())
    assert diff == pytest.approx(0.5) and s == pytest.approx((1 / 3) / 0.5)
    assert rules.position_score_3d("behind", a, b, _depth())[0] == 0.0
    assert rules.position_score_3d("hidden", b, a, _depth())[0] == pytest.approx(2 / 3)   # diff -0.5 < 0


def test_3d_high_overlap_and_edges():
    d = np.zeros((100, 100), np.float32)
    d[18:20, :] = 1.0
    a, b = [0, 0, 20, 20], [0, 0, 18, 20]       # IoU 0.9; A = d[0:20, 0:20] mean 0.1, B = d[0:18, 0:20] mean 0
    assert rules.position_score_3d("in front of", a, b, d)[0] == 1.0
    assert rules.position_score_3d("behind", a, b, d)[0] == 0.0
    assert rules.position_score_3d("behind", b, a, d)[0] == 1.0
    # IoU exactly 0.5 and IoU 0 -> 0
    assert rules.position_score_3d("in front of", [0, 0, 20, 20], [0, 0, 10, 20], d)[0] == 0.0
    assert rules.position_score_3d("in front of", [0, 0, 20, 20], [50, 50, 60, 60], d)[0] == 0.0
    assert rules.position_score_3d(None, a, b, d)[0] == 0.0


def test_3d_image_score_substring_and_index_quirk():
    det = D(["dog", "dog", "wild cat"], [[0, 0, 20, 20], [0, 0, 20, 20], [10, 0, 30, 20]], [0.8, 0.7, 0.6])
    r = rules.spatial3d_score("a dog in front of a cat", "dog", "cat", det, _depth())
    # substring match for "cat"; dog's index is overwritten to 1 before cat is seen at 2
    assert (r.idx1, r.idx2) == (1, 2)
    assert r.score == pytest.approx(0.25 * 0.7 + 0.25 * 0.6 + 0.5 * (2 / 3))
    # one object: no 0.5 cut-off in 3D
    r = rules.spatial3d_score("a dog in front of a horse", "dog", "horse", det, _depth())
    assert r.score == pytest.approx(0.25 * 0.8)


# numeracy -----------------------------------------------------------------------------------------
def _objects():
    return rules.load_objects(read_lines(f"{PROMPTS_DIR}/new_objects.txt"))


def test_numeracy_duplicate_rule():
    assert rules.numeracy_duplicate([0, 0, 99, 99], [0, 0, 99, 104])       # IoU 100*100 / (100*105) > 0.9
    assert rules.numeracy_duplicate([0, 0, 9, 9], [0, 0, 99, 99])          # small one inside: 100/100 of it
    assert not rules.numeracy_duplicate([0, 0, 99, 99], [50, 0, 149, 99])  # IoU 5000/15000
    # +1-pixel areas: two single-point boxes are one 1x1 box each, identical -> duplicates
    assert rules.numeracy_duplicate([5, 5, 5, 5], [5, 5, 5, 5])


def test_numeracy_merging_keeps_other_labels():
    det = D(["dog", "dog", "cat", "dog"], [[0, 0, 99, 99], [1, 1, 99, 99], [0, 0, 99, 99], [300, 0, 399, 99]],
            [0.9, 0.8, 0.7, 0.6])
    labels, boxes = rules.merge_duplicates(det)
    assert labels == ["dog", "cat", "dog"] and boxes[2] == [300, 0, 399, 99]


def test_numeracy_targets_parsing():
    s, p = _objects()
    toks = RuleParser().words("two dogs and a cat.")
    assert toks == ["two", "dogs", "and", "a", "cat", "."]
    assert rules.numeracy_targets(toks, s, p) == (["dog", "cat"], [2, 1])
    assert rules.numeracy_targets(["three", "women"], s, p) == (["woman"], [3])
    # quirk: "a" + plural -> object kept, no count (word2number fails on "a")
    assert rules.numeracy_targets(["a", "dogs"], s, p) == (["dog"], [])


def test_numeracy_score_presence_and_count():
    det = D(["dog", "dog", "cat", "cat"], [[0, 0, 99, 99], [300, 0, 399, 99], [0, 200, 99, 299], [300, 200, 399, 299]],
            [0.9] * 4)
    r = rules.numeracy_score(["dog", "cat"], [2, 1], det)
    assert r.score == pytest.approx(0.5 * 1 + 0.5 * 0.5)      # dog present + count; cat present, 2 != 1


def test_numeracy_synonyms_and_substring_rename():
    det = D(["person", "person", "person"], [[0, 0, 9, 9], [100, 0, 109, 9], [200, 0, 209, 9]], [0.9] * 3)
    assert rules.numeracy_score(["woman"], [3], det).score == 1.0
    det = D(["wild bird", "wild bird", "tree"], [[0, 0, 9, 9], [100, 0, 109, 9], [200, 0, 209, 9]], [0.9] * 3)
    r = rules.numeracy_score(["bird"], [2], det)
    assert r.score == 1.0 and r.kept_labels == ["bird", "bird", "tree"]
    assert rules.numeracy_score(["ship"], [1], D(["boat"], [[0, 0, 9, 9]], [0.9])).score == 1.0
    assert rules.numeracy_score([], [], det).score == 0.0


# B-VQA ----------------------------------------------------------------------------------------------
def test_blip_rounding_before_product():
    # 0.99994 -> '0.9999' per question; 0.9999 ** 8 = 0.99920028 -> '0.9992'
    # (rounding after the product would give 0.99994 ** 8 = 0.99952 -> '0.9995')
    assert rules.blip_image_score([0.99994] * 8) == "0.9992"
    assert rules.blip_image_score([0.12344, 0.5]) == "0.0617"      # 0.1234 * 0.5 = 0.0617
    assert rules.blip_image_score([]) == "1.0000"                  # no noun phrase: every slot scores 1
    assert rules.blip_image_score([0.25] * 9) == "0.0000"          # only np_num = 8 slots (0.25^8 = 1.5e-5)


def test_blip_questions_and_pre_question():
    p = RuleParser()
    assert blip_questions(p, "a green bench and a blue bowl") == ["a green bench?", "a blue bowl?"]
    assert blip_questions(p, "a black and white cat on the left of a dog") == ["a black and white cat?", "a dog?"]
    assert pre_question('A "Red" Car. (big)!?') == "a red car big?"


# 3-in-1 ---------------------------------------------------------------------------------------------
def test_three_in_one_weighting():
    spatial = ["The cat is on the table."]
    action = ["a man rides a horse"]
    assert rules.three_in_one("the cat is on the table", 0.6, 0.2, 0.3, spatial, action) == \
        (pytest.approx(0.4), "spatial")
    assert rules.three_in_one("A man rides a horse.", 0.6, 0.2, 0.3, spatial, action) == (pytest.approx(0.45), "action")
    assert rules.three_in_one("a dog chases a ball", 0.6, 0.2, 0.4, spatial, action) == (pytest.approx(0.4),
                                                                                           "spatial+action")


# rule parser analyses the scorers use ------------------------------------------------------------
def test_rule_parser_objects():
    p = RuleParser()
    assert first_last_nouns(p, "a giraffe next to a lamp") == ("giraffe", "lamp")
    assert complex_objects(p, "The red hat was on top of the brown coat rack.") == ("hat", "coat")
    assert complex_objects(p, "The phone was resting on the charger.") == (None, None)
    assert drop_adjectives(p, "The fluffy cat is on the left of the soft pillow.") == \
        "The cat is on the left of the pillow ."


def test_unidet_frame():
    from taca.eval.score import unidet_frame

    assert unidet_frame((1024, 1024)) == (479, 479)
    # short 768 -> 479, long int(479 * 1024 / 768) = 638 > 480 -> long 480, short int(480 * 479 / 638) = 360
    assert unidet_frame((1024, 768)) == (480, 360)
    assert unidet_frame((768, 1024)) == (360, 480)
