"""AgentNetBench (xlangai, OpenCUA): offline step-level evaluation of GUI agents, as GUI-KV evaluates it.

Data: the hub dataset ``xlangai/AgentNetBench`` (``prepare_data.py agentnetbench``), or ``data_dir`` = a folder of
trajectory JSON files (``mapping*.json`` skipped) with their screenshots under ``images/`` (GUI-KV's
``AGENTNETBENCH_DATA`` / ``AGENTNETBENCH_IMGS``; OpenCUA's ``single_data/`` + ``images/``). A trajectory:
``task_id``, ``high_level_task_description`` (else ``user_task_description``), ``steps[]`` with ``image``,
``inner_monologue{observation, thought, low_level_instruction}``, ``action`` (pyautogui code), ``milestone``,
``ground_truth_actions[]`` and ``alternative_options[]`` (see :mod:`kvbench.metrics.agentnet`).

Context of step k (SalesforceAIResearch/GUI-KV @ b301d41, ``eval/agentnetbench_eval.py``): for every earlier step
j < k, a user turn with its screenshot if j is among the last ``image_slots - 1`` steps, then, if j is among the
last ``max_history`` (10) steps, an assistant turn ``# Step j+1:\\n`` + the history text; finally a user turn with
the current screenshot and the model's prompt (UI-TARS or OpenCUA, verbatim) formatted with the instruction.
The question is that prompt text; its answer is scored by ``agentnet_step`` with the model's action parser
(``action_format``).

History text (``history``):

* ``model``: GUI-KV's protocol, the model's **own** earlier output for step j, ``Step j+1:\\n<output>``. A step's
  prompt then depends on the previous steps' predictions: each sample names them (``meta["history_of"]``, the
  sample ids of its earlier steps) and the runner, which runs a trajectory's steps in order, rebuilds it with the
  task's ``history_hook`` (:func:`with_own_history`) from the raw predictions of those steps (a resumed run reads
  them from its predictions file). Outside the runner: :func:`run_trajectory` with a ``generate(sample) -> str``.
* ``ground_truth``: the authors' fallback for steps without an own output, ``## Observation / ## Thought /
  ## Action`` from the annotated inner monologue.

Deviations: the authors' OpenCUA branch attaches history screenshots to the wrong steps (its ``elif`` hangs on
the image check and reuses a stale path); kvbench gives both models the UI-TARS layout. Step scores follow GUI-KV's
scorer, not OpenCUA's own ``evaluation/agentnetbench/eval.py`` (which merges write + enter, among others).
:func:`official_scores` reports GUI-KV's numbers: step accuracy (mean step score), the trajectory average, the
per-action-type means over steps that produced a parsable action (the authors' table skips the others), the
milestone score and the alternative matches. ``score_by_category`` (by ground-truth action type) counts every step.
"""

from __future__ import annotations

import json
import zipfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvbench.errors import UsageError
from kvbench.metrics.agentnet import ACTION_TYPES, parse_actions, step_score
from kvbench.tasks import hub
from kvbench.tasks.base import IMAGE, Question, Sample
from kvbench.tasks.vision import image_size

BENCHMARK = "agentnetbench"
REPO_ID = "xlangai/AgentNetBench"
#: No commit of the hub dataset could be checked from here: ``prepare`` records the commit ``main`` resolved to and
#: every file's SHA-256 in ``source.json``; set a sha here to pin it.
REVISION = "main"
FORMATS = ("uitars", "opencua")
HISTORIES = ("ground_truth", "model")

PROMPT_UITARS = (
    'You are a GUI agent. You are given a task and your action history, with screenshots. You need to per'
    'form the next action to complete the task.\n'
    '\n'
    '## Output Format\n'
    'You should first think about the reasoning process in the mind and then provide the user with the answer. \n'
    'The reasoning process is enclosed within <think> </think> tags\n'
    'After the <think> tags, you should place final answer, which concludes your summarized thought and y'
    'our action.\n'
    '\n'
    'For example,\n'
    '```\n'
    '<think>detailed reasoning content here</think>\n'
    'Thought: a small plan and finally summarize your next action (with its target element) in one sentence\n'
    'Action: ...\n'
    '```\n'
    '\n'
    '## Action Space\n'
    '\n'
    "click(point='<point>x1 y1</point>')\n"
    "left_double(point='<point>x1 y1</point>')\n"
    "right_single(point='<point>x1 y1</point>')\n"
    "drag(start_point='<point>x1 y1</point>', end_point='<point>x2 y2</point>')\n"
    "hotkey(key='ctrl c') # Split keys with a space and use lowercase. Also, do not use more than 3 keys "
    'in one hotkey action.\n'
    'type(content=\'xxx\') # Use escape characters \\\', \\", and \\n in content part to ensure we can parse th'
    'e content in normal python string format. If you want to submit your input, use \\n at the end of con'
    'tent. \n'
    "scroll(point='<point>x1 y1</point>', direction='down or up or right or left') # Show more informatio"
    'n on the `direction` side.\n'
    'wait() #Sleep for 5s and take a screenshot to check for any changes.\n'
    'finished(content=\'successful|failure\') # Use escape characters \\\', \\", and \\n in content part to ens'
    'ure we can parse the content in normal python string format.\n'
    '\n'
    '## Output Example\n'
    "Thought: Let's click ...\n"
    "Action: click(point='<point>100 200</point>')\n"
    '\n'
    '## Note\n'
    '- Use English in `Thought` part.\n'
    '- Write a small plan and finally summarize your next action (with its target element) in one sentenc'
    'e in `Thought` part.\n'
    '- If you have executed several same actions (like repeatedly clicking the same point) but the screen'
    ' keeps no change, please try to execute a modified action when necessary.\n'
    '- finished content should be either`successful` or `failure`.\n'
    '\n'
    '## User Instruction\n'
    '{instruction}\n'
    '\n'
    'Please generate the next move according to the screenshot and task instruction.\n'
)

PROMPT_OPENCUA = (
    'You are a GUI agent. You are given a task and a screenshot of the screen. You need to perform a seri'
    'es of pyautogui actions to complete the task.\n'
    '\n'
    'For each step, provide your response in this format:\n'
    '\n'
    'Thought:\n'
    '  - Step by Step Progress Assessment:\n'
    '    - Analyze completed task parts and their contribution to the overall goal\n'
    '    - Reflect on potential errors, unexpected results, or obstacles\n'
    '    - If previous action was incorrect, predict a logical recovery step\n'
    '  - Next Action Analysis:\n'
    '    - List possible next actions based on current state\n'
    '    - Evaluate options considering current state and previous actions\n'
    '    - Propose most logical next action\n'
    '    - Anticipate consequences of the proposed action\n'
    '  - For Text Input Actions:\n'
    '    - Note current cursor position\n'
    '    - Consolidate repetitive actions (specify count for multiple keypresses)\n'
    '    - Describe expected final text outcome\n'
    '    - Use first-person perspective in reasoning\n'
    '\n'
    'Action:\n'
    '  Provide clear, concise, and actionable instructions:\n'
    '  - If the action involves interacting with a specific target:\n'
    '    - Describe target explicitly without using coordinates\n'
    '    - Specify element names when possible (use original language if non-English)\n'
    '    - Describe features (shape, color, position) if name unavailable\n'
    '    - For window control buttons, identify correctly (minimize "—", maximize "□", close "X")\n'
    "  - if the action involves keyboard actions like 'press', 'write', 'hotkey':\n"
    '    - Consolidate repetitive keypresses with count\n'
    '    - Specify expected text outcome for typing actions\n'
    '\n'
    'Finally, output the action as PyAutoGUI code or the following functions:\n'
    '- {{"name": "computer.triple_click", "description": "Triple click on the screen", "parameters": {{"t'
    'ype": "object", "properties": {{"x": {{"type": "number", "description": "The x coordinate of the tri'
    'ple click"}}, "y": {{"type": "number", "description": "The y coordinate of the triple click"}}}}, "r'
    'equired": ["x", "y"]}}}}\n'
    '- {{"name": "computer.terminate", "description": "Terminate the current task and report its completi'
    'on status", "parameters": {{"type": "object", "properties": {{"status": {{"type": "string", "enum": '
    '["success", "failure"], "description": "The status of the task"}}}}, "required": ["status"]}}}}\n'
    '\n'
    '# Task Instruction:\n'
    '{instruction}\n'
    '\n'
    'Please generate the next move according to the screenshot and task instruction.\n'
)

STEP_TEMPLATE = '# Step {step_num}:\n'
HISTORY_TEMPLATE = '## Observation:\n{observation}\n\n## Thought:\n{thought}\n\n## Action:\n{action}\n'
PROMPTS = {"uitars": PROMPT_UITARS, "opencua": PROMPT_OPENCUA}


def trajectory_files(data_dir: str | Path) -> list[Path]:
    """The trajectory JSON files of a release folder (``mapping*`` skipped), sorted by name."""
    base = Path(data_dir)
    for folder in (base, base / "test_data", base / "single_data"):
        files = sorted(p for p in folder.glob("*.json") if not p.name.startswith("mapping") and p.name != "source.json")
        if files:
            return files
    return []


def images_dir(data_dir: str | Path, files: Sequence[Path]) -> Path:
    """``images/`` next to the trajectory files."""
    return files[0].parent / "images" if files else Path(data_dir) / "images"


def history_text(traj: Mapping[str, Any], j: int, own: Mapping[int, str] | None) -> str:
    """The assistant turn for earlier step ``j``: the model's own output, else the annotated monologue."""
    if own is not None and j in own:
        return STEP_TEMPLATE.format(step_num=j + 1) + f"Step {j + 1}:\n{own[j]}"
    mono = traj["steps"][j].get("inner_monologue") or {}
    return STEP_TEMPLATE.format(step_num=j + 1) + HISTORY_TEMPLATE.format(
        observation=mono.get("observation", ""), thought=mono.get("thought", ""),
        action=mono.get("low_level_instruction", ""))


def step_messages(traj: Mapping[str, Any], k: int, image_root: Path, own: Mapping[int, str] | None = None,
                  image_slots: int = 5, max_history: int = 10) -> tuple[list[dict[str, Any]], list[str]]:
    """Chat turns before step ``k``'s prompt (the current screenshot last) and the screenshot paths in order."""
    steps = traj["steps"]
    slots = min(image_slots - 1, k)
    with_image = set(range(k)[-slots:]) if slots > 0 else set()
    messages: list[dict[str, Any]] = []
    images: list[str] = []
    for j in range(k):
        if j in with_image:
            messages.append({"role": "user", "content": [{"type": "image"}]})
            images.append(str(image_root / steps[j]["image"]))
        if j >= max(0, k - max_history):
            messages.append({"role": "assistant", "content": history_text(traj, j, own)})
    messages.append({"role": "user", "content": [{"type": "image"}]})
    images.append(str(image_root / steps[k]["image"]))
    return messages, images


def render(messages: Sequence[Mapping[str, Any]]) -> str:
    """The turns as plain text (for models without a chat template), images as :data:`IMAGE` placeholders."""
    parts = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = "".join(IMAGE if c["type"] == "image" else c.get("text", "") for c in content)
        parts.append(f"{m['role']}:\n{content}\n")
    return "".join(parts)


def instruction(traj: Mapping[str, Any]) -> str:
    return traj.get("high_level_task_description", traj.get("user_task_description", ""))


def step_sample(traj: Mapping[str, Any], k: int, image_root: Path, action_format: str = "uitars",
                own: Mapping[int, str] | None = None, image_slots: int = 5, max_history: int = 10) -> Sample:
    """Step ``k`` of a trajectory as a sample: the context turns, the prompt as the question, the step's ground
    truth as the reference (JSON), the parser and screenshot size as metric arguments."""
    step = traj["steps"][k]
    messages, images = step_messages(traj, k, image_root, own, image_slots, max_history)
    shot = hub.require(images[-1], BENCHMARK, f"AgentNetBench screenshot of {traj['task_id']} step {k + 1}")
    gt = step.get("ground_truth_actions") or []
    reference = json.dumps({"ground_truth_actions": gt, "alternative_options": step.get("alternative_options") or []})
    meta = {"trajectory": traj["task_id"], "step": k, "milestone": bool(step.get("milestone", False)),
            "category": gt[0]["type"].lower() if gt else "none",
            "metric_kwargs": {"action_format": action_format, "image_size": list(image_size(shot))}}
    question = Question(id="0", text=PROMPTS[action_format].format(instruction=instruction(traj)),
                        answers=[reference], meta=meta)
    return Sample(id=f"{traj['task_id']}/{k}", context=render(messages), questions=[question], images=images,
                  messages=messages, meta={"trajectory": traj["task_id"], "step": k, "n_images": len(images)})


def own_history_sample(path: Path, traj: Mapping[str, Any], k: int, image_root: Path, action_format: str,
                       image_slots: int, max_history: int) -> Sample:
    """Step ``k`` for ``history=model`` before the earlier outputs are known: the ground-truth layout, with what
    :func:`with_own_history` needs to rebuild it (the earlier steps' sample ids, the trajectory file)."""
    sample = step_sample(traj, k, image_root, action_format, None, image_slots, max_history)
    sample.meta.update(history_of=[f"{traj['task_id']}/{j}" for j in range(max(0, k - max_history), k)],
                       source=str(path), image_root=str(image_root), action_format=action_format,
                       image_slots=image_slots, max_history=max_history)
    return sample


def with_own_history(sample: Sample, predictions: Mapping[str, str]) -> Sample:
    """The task's ``history_hook``: step ``sample`` rebuilt with the model's own raw outputs of its earlier steps
    (``predictions``: sample id -> raw prediction); a sample without ``meta["history_of"]`` is returned as it is."""
    earlier = sample.meta.get("history_of")
    if not earlier:
        return sample
    missing = [sid for sid in earlier if sid not in predictions]
    if missing:
        raise UsageError(f"AgentNetBench step {sample.id} (history=model) needs the model's output of {missing[0]} "
                         "first; run a trajectory's steps in order (no limit that cuts a trajectory before it)")
    m = sample.meta
    traj = json.loads(Path(m["source"]).read_text())
    own = {int(sid.rsplit("/", 1)[1]): predictions[sid] for sid in earlier}
    rebuilt = step_sample(traj, m["step"], Path(m["image_root"]), m["action_format"], own, m["image_slots"],
                          m["max_history"])
    rebuilt.meta.update({k: v for k, v in m.items() if k not in rebuilt.meta})
    return rebuilt


def _check(action_format: str, history: str, image_slots: int) -> None:
    if action_format not in FORMATS:
        raise UsageError(f"task.loader.action_format={action_format!r}; choose one of {', '.join(FORMATS)}")
    if history not in HISTORIES:
        raise UsageError(f"task.loader.history={history!r}; choose one of {', '.join(HISTORIES)}")
    if image_slots < 1:
        raise UsageError(f"task.loader.image_slots must be >= 1 (the current screenshot), got {image_slots}")


def load(data_dir: str | Path, action_format: str = "uitars", history: str = "ground_truth", image_slots: int = 5,
         max_history: int = 10, limit: int | None = None) -> list[Sample]:
    """Every step of every trajectory (in file, then step order) as one sample (``limit``: the first steps)."""
    _check(action_format, history, image_slots)
    files = trajectory_files(hub.require(data_dir, BENCHMARK, "AgentNetBench"))
    if not files:
        raise hub.DataMissingError(hub.missing_message(BENCHMARK, "AgentNetBench", Path(data_dir) / "*.json"))
    root = images_dir(data_dir, files)
    samples: list[Sample] = []
    for path in files:
        traj = json.loads(path.read_text())
        for k in range(len(traj["steps"])):
            if limit is not None and len(samples) >= limit:
                return samples
            samples.append(own_history_sample(path, traj, k, root, action_format, image_slots, max_history)
                           if history == "model" else
                           step_sample(traj, k, root, action_format, None, image_slots, max_history))
    return samples


def run_trajectory(traj: Mapping[str, Any], image_root: str | Path, generate: Callable[[Sample], str],
                   action_format: str = "uitars", image_slots: int = 5, max_history: int = 10
                   ) -> list[tuple[Sample, str]]:
    """GUI-KV's loop over one trajectory: each step's context holds the model's own earlier outputs."""
    own: dict[int, str] = {}
    out = []
    for k in range(len(traj["steps"])):
        sample = step_sample(traj, k, Path(image_root), action_format, own, image_slots, max_history)
        own[k] = generate(sample)
        out.append((sample, own[k]))
    return out


def prepare(dest: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """Download the hub dataset at :data:`REVISION` into ``dest``, extract its zip archives, record checksums."""
    from huggingface_hub import snapshot_download

    dest = Path(dest)
    if not hub.hub_reachable():
        raise hub.DataMissingError(hub.missing_message(BENCHMARK, f"{REPO_ID}@{REVISION}", dest))
    snapshot_download(REPO_ID, repo_type="dataset", revision=REVISION, local_dir=dest)
    for archive in dest.rglob("*.zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(archive.parent)
    return record_files(dest, REPO_ID, REVISION)


def record_files(dest: Path, repo_id: str, revision: str) -> list[Path]:
    """Record every downloaded file's SHA-256 and the resolved commit in ``dest/source.json``."""
    from kvbench.tasks import pinned

    commit = hub.resolved_commit(repo_id, revision)
    files = [p for p in dest.rglob("*") if p.is_file() and ".cache" not in p.parts and p.name != pinned.SOURCE_FILE]
    for p in files:
        pinned.record(dest, pinned.provenance(p, dest, f"hf://datasets/{repo_id}", pinned.sha256_file(p), None,
                                              revision=revision, commit=commit))
    return files


def official_scores(records: list[dict[str, Any]], task: Mapping[str, Any]) -> dict[str, Any]:
    """GUI-KV's AgentNetBench numbers (x100) recomputed from the records' predictions."""
    traj: dict[str, list[float]] = defaultdict(list)
    by_type: dict[str, list[float]] = {t: [] for t in ACTION_TYPES}
    milestones, alternatives = [], 0
    for r in records:
        kw, gt = r["meta"]["metric_kwargs"], json.loads(r["references"][0])
        predicted = parse_actions(r["prediction"], kw["action_format"], *kw["image_size"])
        score, used = step_score(predicted, gt["ground_truth_actions"], gt["alternative_options"])
        traj[r["meta"]["trajectory"]].append(score)
        if predicted and gt["ground_truth_actions"]:
            kind = gt["ground_truth_actions"][0]["type"].lower()
            if kind in by_type:  # the authors' table has the 11 types; others (e.g. none) are left out
                by_type[kind].append(score)
            milestones += [score] if r["meta"].get("milestone") else []
            alternatives += used
    steps = [s for v in traj.values() for s in v]
    return {"step_accuracy": 100 * sum(steps) / len(steps),
            "average_trajectory_score": 100 * sum(sum(v) / len(v) for v in traj.values()) / len(traj),
            "action_type_scores": {k: 100 * sum(v) / len(v) for k, v in by_type.items() if v},
            "action_type_counts": {k: len(v) for k, v in by_type.items() if v},
            "milestone_score": 100 * sum(milestones) / len(milestones) if milestones else None,
            "milestone_steps": len(milestones), "alternative_matches": alternatives,
            "n_steps": len(steps), "n_trajectories": len(traj)}
