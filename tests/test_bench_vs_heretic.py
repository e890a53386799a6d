"""tools/bench_vs_heretic.py's own parts: the config it hands heretic and what it reads back.

heretic itself is not installed for the tests (it needs torch); the side-by-side run and its
figures are in docs/results.md.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from gguf_abliterate.direction import prompts as P
from tools.bench_vs_heretic import HARMLESS_FOR_KL, QWEN_SYSTEM, heretic_config, heretic_scores, write_prompts

# The lines heretic 1.4.0 prints, as it prints them (its pick menu, and its evaluate mode).
SEARCH_LOG = """* Initial refusals: 49/72
[1] [Trial  17] Refusals:  0/72, KL divergence: 0.3120
[2] [Trial   4] Refusals:  3/72, KL divergence: 0.1011
[3] Run additional trials
"""
EVALUATE_LOG = """* Initial refusals: 49/72

Loading model /w/heretic-q4-float...
* Evaluating...
  * Obtaining first-token probability distributions...
  * KL divergence: 0.3342
  * Counting model refusals...
  * Refusals: 2/72
"""


def test_config_gives_heretic_our_prompts_and_budget(tmp_path: Path) -> None:
    write_prompts(tmp_path / "prompts")
    heretic_config(tmp_path / "h" / "config.toml", tmp_path / "float", 30, 9, tmp_path / "prompts")
    config = tomllib.loads((tmp_path / "h" / "config.toml").read_text())
    assert (config["n_trials"], config["n_startup_trials"], config["dtypes"]) == (30, 9, ["float32"])
    assert config["system_prompt"] == QWEN_SYSTEM and "evaluate_model" not in config
    harmful = Path(config["bad_prompts"]["dataset"]).read_text().splitlines()
    assert harmful == P.default_prompts("direction")[0]
    assert Path(config["bad_evaluation_prompts"]["dataset"]).read_text().splitlines() == \
        P.default_prompts("validation")[0]
    assert config["good_evaluation_prompts"]["split"] == f"[:{HARMLESS_FOR_KL}]"
    heretic_config(tmp_path / "e" / "config.toml", tmp_path / "float", 30, 9, tmp_path / "prompts",
                   evaluate=tmp_path / "q4")
    assert tomllib.loads((tmp_path / "e" / "config.toml").read_text())["evaluate_model"] == str(tmp_path / "q4")


def test_reads_heretics_pick_and_its_evaluation(tmp_path: Path) -> None:
    (tmp_path / "search.log").write_text(SEARCH_LOG)
    (tmp_path / "evaluate.log").write_text(EVALUATE_LOG)
    assert heretic_scores(tmp_path / "search.log") == {"original refusals": "49/72", "trial": "17",
                                                       "refusals": "0/72", "kl": "0.3120"}
    assert heretic_scores(tmp_path / "evaluate.log") == {"original refusals": "49/72", "refusals": "2/72",
                                                         "kl": "0.3342"}
