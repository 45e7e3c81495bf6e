"""Story files with a character sheet: the one composition rule, the shipped story, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kolors_lib.core.config import CONFIG_DIR
from kolors_lib.core.errors import StoryError
from kolors_lib.kolors.prompt_rule import compose_prompt
from kolors_lib.kolors.story import load_story

# The camp's 8 final prompts, as printed in its learner notes (the story file held them verbatim before)
CAMP_PROMPTS = [
    "古风，水墨画，一个黑色长发少女，坐在古代书院的教室里，认真听讲，盯着老师手中的竹简，上半身，绿色长裙，背景有木质桌椅和古书架",
    "古风，水墨画，一个黑色长发少女，伏在书桌上，眼睛半闭，显露出疲惫感，上半身，绿色长裙，周围书籍散乱，窗外夕阳透进来",
    "古风，水墨画，一个黑色长发少女，站在一条青石板小路旁，四周桃花盛开，全身，白色飘逸长裙，背景是远处的古风建筑，天空中有几朵淡云",
    "古风，水墨画，一位身穿银色盔甲的年轻王子，骑着一匹白色骏马从远处走来，手持长剑，全身，背景为古风山野，桃花纷飞",
    "古风，水墨画，黑色长发少女与身穿银甲的王子站在路旁，微笑交谈，彼此注视，上半身，少女着白色长裙，王子手持缰绳，背景为桃花盛开的古风小路",
    "古风，水墨画，黑色长发少女与王子共骑一匹白马，少女侧坐在马背上，双手环抱王子的腰，全身，少女穿白色长裙，王子穿银甲，背景为青山绿水",
    "古风，水墨画，黑色长发少女从书桌上抬起头，眼神迷茫刚从梦中醒来，上半身，绿色长裙，书桌上的竹简散乱，窗外阳光明媚",
    "古风，水墨画，黑色长发少女站在教室中，手握毛笔在书案上认真书写，全身，绿色长裙，背景为书院的木质书架和摆满书籍的桌子",
]


def shipped() -> dict:
    return yaml.safe_load((CONFIG_DIR / "story.yaml").read_text(encoding="utf-8"))


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_the_shipped_story_composes_the_camps_exact_prompts() -> None:
    raw = shipped()
    assert raw["characters"] and all("prompt" not in s for s in raw["scenes"]), "the shipped story uses parts"
    story = load_story(CONFIG_DIR / "story.yaml")
    assert [s.prompt for s in story.scenes] == CAMP_PROMPTS
    assert [s.seed for s in story.scenes] == list(range(1, 9)) and story.scenes[6].scene == "下课了，梦醒了"


def test_a_character_is_described_by_the_sheet_in_every_panel_that_places_it(tmp_path: Path) -> None:
    raw = shipped()
    raw["characters"]["少女"] = "红色短发少女"
    story = load_story(write(tmp_path / "s.yaml", raw))
    placed = [i for i, s in enumerate(raw["scenes"]) if "{少女}" in s["action"]]
    assert placed == [0, 1, 2, 4, 5, 6, 7]
    for i in placed:
        assert "红色短发少女" in story.scenes[i].prompt and "黑色长发少女" not in story.scenes[i].prompt
    assert story.scenes[3].prompt == CAMP_PROMPTS[3], "the prince's scene does not change"


def test_the_rule_orders_the_parts_and_leaves_out_empty_ones() -> None:
    sheet = {"猫": "橘色小猫"}
    assert compose_prompt("古风", sheet, "{猫}在睡觉", "全身", "", "窗边") == "古风，橘色小猫在睡觉，全身，窗边"
    assert compose_prompt("", sheet, " 一只{猫} ", "上半身", "戴铃铛") == "一只橘色小猫，上半身，戴铃铛"


def test_plain_prompt_scenes_are_still_accepted_next_to_composed_ones(tmp_path: Path) -> None:
    raw = shipped()
    raw["scenes"][0] = {"scene": "自己写的", "prompt": "古风，一只白鹤", "seed": 11}
    story = load_story(write(tmp_path / "s.yaml", raw))
    assert story.scenes[0].prompt == "古风，一只白鹤" and story.scenes[1].prompt == CAMP_PROMPTS[1]


BAD = {
    "unknown_character": (lambda d: d["scenes"][3].update(characters=["公主"], action="一位{公主}"),
                          r"scene 4: unknown character\(s\) 公主 \(character sheet: 少女, 王子\)"),
    "unknown_placeholder": (lambda d: d["scenes"][1].update(characters=[], action="{书生}在读书"),
                            r"scene 2: unknown character\(s\) 书生"),
    "bad_framing": (lambda d: d["scenes"][2].update(framing="半身"),
                    r"scene 3: framing must be 全身 or 上半身, not '半身'"),
    "no_framing": (lambda d: d["scenes"][0].pop("framing"), r"scene 1: framing must be 全身 or 上半身, not None"),
    "unknown_scene_key": (lambda d: d["scenes"][4].update(framming="全身"), r"scene 5: unknown key\(s\) framming"),
    "unknown_top_key": (lambda d: d.update(charaters={}), r"unknown key\(s\) charaters"),
    "prompt_and_parts": (lambda d: d["scenes"][5].update(prompt="古风"), r"scene 6: give either a finished prompt"),
    "no_action": (lambda d: d["scenes"][6].pop("action"), r"scene 7: action is empty or missing"),
    "listed_not_placed": (lambda d: d["scenes"][4].update(characters=["少女", "王子"]),
                          r"scene 5: character\(s\) 王子 listed but not placed in the action as \{王子\}"),
    "sheet_not_mapping": (lambda d: d.update(characters=["少女"]), r"'characters' must be a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_structured_scenes_give_one_line_errors(case: str, tmp_path: Path) -> None:
    change, message = BAD[case]
    raw = shipped()
    change(raw)
    path = write(tmp_path / "story.yaml", raw)
    with pytest.raises(StoryError, match=message) as err:
        load_story(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_the_storyboard_command_reports_a_bad_character_in_one_line(tmp_path: Path, capsys) -> None:
    from kolors_lib.cli.main import main

    raw = shipped()
    raw["scenes"][0]["action"] = "一个{小女孩}，坐着"
    path = write(tmp_path / "story.yaml", raw)
    code = main(["storyboard", "--profile", "tiny", "--workdir", str(tmp_path / "w"), "--story", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {path}: scene 1: unknown character(s) 小女孩")
