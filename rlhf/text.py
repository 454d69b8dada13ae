"""Text normalization shared by world generation, splitting, leakage checks and deduplication: one key
for "the same prompt" everywhere."""

import re
import unicodedata

_SPACE = re.compile(r"\s+")

# This project's chat markers (special tokens of the tokenizer `pretrain` trains; rlhf.tokenization.CHAT_TEMPLATE).
BOS, EOS, PAD, USER, ASSISTANT = "<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>"


def normalize(text: str) -> str:
    """Case-folded, NFKC, whitespace collapsed: two prompts equal under this are the same prompt."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


# ----------------------------------------------------------------------------------------------
# Chat transcripts in any common format -> (role, text) turns, for leakage checks


_ROLE_WORDS = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
               "bot": "assistant", "system": "system"}

# Markers that open a turn (named group `role`, or the fixed role after the pattern) or end one (None).
_MARKERS: list[tuple[str, str | None]] = [
    (r"<\|(?P<role>user|assistant|system)\|>", ""),                               # this project, Phi-3, Zephyr
    (r"<\|(?:bos|eos|pad|end|endoftext)\|>", None),
    (r"<\|im_start\|>[ \t]*(?P<role>user|assistant|system)\b", ""),              # ChatML (Qwen, OpenAI)
    (r"<\|im_end\|>", None),
    (r"<\|start_header_id\|>\s*(?P<role>user|assistant|system)\s*<\|end_header_id\|>", ""),  # Llama 3
    (r"<\|eot_id\|>|<\|begin_of_text\|>|<\|end_of_text\|>", None),
    (r"<start_of_turn>[ \t]*(?P<role>user|model|system)\b", ""),                  # Gemma
    (r"<end_of_turn>", None),
    (r"<<SYS>>", "system"), (r"<</SYS>>", "user"),                                # Llama 2
    (r"\[INST\]", "user"), (r"\[/INST\]", "assistant"),
    (r"</?s>", None),
    (r"###\s*(?:Instruction|Input)\s*:", "user"), (r"###\s*Response\s*:", "assistant"),  # Alpaca
    (r"(?:^|(?<=\n))[ \t]*(?P<role>human|user|assistant|gpt|bot|system)[ \t]*:", ""),   # HH, Vicuna, ShareGPT
]
_MARKER = re.compile("|".join(f"(?P<m{i}>{pattern.replace('(?P<role>', f'(?P<r{i}>')})"
                              for i, (pattern, _) in enumerate(_MARKERS)), re.IGNORECASE)


def chat_turns(text: str, *, default: str | None = None) -> list[tuple[str, str]]:
    """`text` split at the chat markers of the common formats (this project's `<|user|>`, HH's
    "\\n\\nHuman: … \\n\\nAssistant:", ChatML, Llama 2 `[INST]`, Llama 3, Gemma, Alpaca, Vicuna) into
    (role, normalized text) turns, empty turns left out. Text outside any turn (before the first marker, or
    after an end marker) gets the role `default` (None: dropped); so a plain prompt read with
    default="user" is one user turn, and a corpus document without markers has no turns."""
    turns: list[tuple[str, str]] = []
    role, start = default, 0

    def close(end: int) -> None:
        body = normalize(text[start:end])
        if role is not None and body:
            turns.append((role, body))

    for m in _MARKER.finditer(text):
        close(m.start())
        i = next(j for j in range(len(_MARKERS)) if m.group(f"m{j}") is not None)
        fixed = _MARKERS[i][1]
        role = _ROLE_WORDS[m.group(f"r{i}").lower()] if fixed == "" else fixed
        start = m.end()
    close(len(text))
    return turns


# ----------------------------------------------------------------------------------------------
# Conversations as prompt text: one string that every file and stage carries, turned into chat
# messages only where a tokenizer's chat template renders it (rlhf.tokenization.chat_prompt)

_SPEAKERS = {"Human": "user", "Assistant": "assistant", "System": "system"}
_NAMES = {role: name for name, role in _SPEAKERS.items()}
_TURN_SPLIT = re.compile(r"\n\n(?=(?:Human|Assistant|System): )")


def transcript(turns: list[tuple[str, str]]) -> str:
    """(role, text) turns -> the prompt text: plain for a single user question, else
    "Human: …\n\nAssistant: …\n\nHuman: …" (a system message as "System: …"), the HH convention."""
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1].strip()
    return "\n\n".join(f"{_NAMES[role]}: {text.strip()}" for role, text in turns)


def conversation(prompt: str) -> list[dict[str, str]]:
    """The chat messages of a prompt text: a transcript (`transcript`: it opens with "Human: " or
    "System: " and has an "\n\nAssistant: " turn) gives one message per turn, in order; any other text
    is one user message."""
    parts = _TURN_SPLIT.split(prompt.strip())
    if len(parts) < 2 or not parts[0].startswith(("Human: ", "System: ")):
        return [{"role": "user", "content": prompt}]
    messages = []
    for part in parts:
        name, text = part.split(": ", 1)
        messages.append({"role": _SPEAKERS[name], "content": text.strip()})
    if not any(m["role"] == "assistant" for m in messages):
        return [{"role": "user", "content": prompt}]
    return messages


def template_text(messages: list[dict[str, str]]) -> str:
    """A conversation written the way this project's chat template renders it, as a corpus document:
    `<|user|>q1<|assistant|>a1<|eos|><|user|>q2<|assistant|>a2` (a system message as a user turn).
    `pretrain` adds BOS before a document and EOS after it, so the model pretrains on exactly what the
    template later shows it (docs/formats.md, "The chat template and the corpus")."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            out.append(ASSISTANT + m["content"] + ("" if i == len(messages) - 1 else EOS))
        else:
            out.append(USER + m["content"])
    return "".join(out)
