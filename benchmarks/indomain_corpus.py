"""A distillation corpus of in-domain public text, to bound what the choice of corpus can do for the emulator.

    python benchmarks/indomain_corpus.py -o offsite-corpora/indomain.jsonl

The model owner has no task data, but it may have public text of the tasks' domains. This stands in for it
with the built-in data no data owner trains on and no test scores: the bbc-news validation articles (the
text only, without the topic), the wordnet validation entries as dictionary lines ("word: definition"; the
splits are disjoint by lemma, so no test answer appears), and the start of each austen training novel, half
as many characters as those together, so the default corpus makes a third of the mix. An optimistic corpus: a real model owner
rarely holds text this close to a customer's task. Writes `{"text": ...}` lines that `--distill` reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from offsite.data.builtin import load_builtin
from offsite.files import atomic_file

# The built-in tasks' prompts around the text (offsite.data.builtin), which the corpus leaves out.
ARTICLE, TOPIC = "Article: ", "\nTopic:"
DEFINITION, WORD = "Definition: ", "\nWord:"


def article_text(context: str) -> str:
    """The article of a bbc-news choice context, without the prompt around it."""
    return context.removeprefix(ARTICLE).removesuffix(TOPIC)


def dictionary_line(context: str, answer: str) -> str:
    """A wordnet choice example ("Definition: D\\nWord:", " w") as a dictionary entry "w: D"."""
    return f"{answer.strip()}: {context.removeprefix(DEFINITION).removesuffix(WORD)}"


def indomain_texts() -> list[str]:
    news = [article_text(e.context) for e in load_builtin("bbc-news:validation", "validation").examples]
    words = load_builtin("wordnet:validation", "validation").examples
    dictionary = "\n".join(dictionary_line(e.context, e.choices[e.label]) for e in words)
    in_domain = sum(map(len, news)) + len(dictionary)
    novels = load_builtin("austen:train", "train").texts
    per_novel = in_domain // (2 * len(novels))  # characters: the novels make a third of the mix
    return news + [dictionary] + [novel[:per_novel] for novel in novels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    texts = indomain_texts()
    with atomic_file(Path(args.output)) as tmp:
        tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    print(f"{args.output}: {len(texts)} texts, {sum(map(len, texts)):,} characters")


if __name__ == "__main__":
    main()
