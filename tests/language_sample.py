# ruff: noqa: RUF001 - the sample is text in its own scripts, full-width punctuation included
"""A small multilingual sample for the language detector: 12 languages, 4 sentences each, written for
the tests (everyday prompts of the length people type, not text from the detector's training data)."""

from __future__ import annotations

__all__ = ["SAMPLE", "accuracy"]

from collections.abc import Callable

SAMPLE: dict[str, list[str]] = {
    "en": [
        "Can you help me write a polite email to my landlord about the broken heater?",
        "Summarize the main causes of the First World War in three sentences.",
        "What is the difference between a list and a tuple in Python?",
        "My dog keeps barking at night, what should I do?",
    ],
    "de": [
        "Kannst du mir bitte erklären, wie eine Wärmepumpe funktioniert?",
        "Schreib mir ein kurzes Gedicht über den Herbst im Wald.",
        "Was ist der Unterschied zwischen einer GmbH und einer AG?",
        "Ich brauche ein Rezept für einen einfachen Apfelkuchen ohne Ei.",
    ],
    "fr": [
        "Peux-tu m'expliquer comment fonctionne la photosynthèse des plantes ?",
        "Écris une lettre de motivation pour un poste de développeur web.",
        "Quels sont les meilleurs endroits à visiter en Bretagne en été ?",
        "Je cherche une recette de soupe à l'oignon facile à préparer.",
    ],
    "es": [
        "¿Me puedes ayudar a planificar un viaje de una semana por Andalucía?",
        "Explica la diferencia entre el pretérito perfecto y el indefinido.",
        "Necesito ideas para la fiesta de cumpleaños de mi hija de seis años.",
        "¿Cuál es la mejor manera de aprender a tocar la guitarra sola?",
    ],
    "it": [
        "Puoi consigliarmi un buon libro da leggere durante le vacanze estive?",
        "Come si prepara una vera carbonara senza usare la panna?",
        "Spiegami in parole semplici che cos'è l'inflazione.",
        "Scrivi un messaggio di auguri per il matrimonio di mio fratello.",
    ],
    "pt": [
        "Você pode me ajudar a escrever um currículo para uma vaga de enfermagem?",
        "Quais são os principais pontos turísticos de Lisboa?",
        "Explique como funciona o sistema imunológico de forma simples.",
        "Preciso de uma receita de bolo de cenoura com cobertura de chocolate.",
    ],
    "nl": [
        "Kun je me uitleggen hoe ik mijn belastingaangifte moet invullen?",
        "Schrijf een korte samenvatting van het boek dat ik je gaf.",
        "Wat zijn goede tips om beter te slapen als je veel stress hebt?",
        "Ik wil mijn tuin opnieuw inrichten met inheemse planten.",
    ],
    "ru": [
        "Помоги мне составить план тренировок на неделю для начинающих.",
        "Объясни, пожалуйста, как работает двигатель внутреннего сгорания.",
        "Напиши короткий рассказ о коте, который умел говорить.",
        "Какие книги стоит прочитать, чтобы лучше понять историю России?",
    ],
    "pl": [
        "Czy możesz mi pomóc napisać podanie o urlop do szefa?",
        "Jakie są najciekawsze miejsca do zwiedzania w Krakowie?",
        "Wyjaśnij mi prostymi słowami, czym jest sztuczna inteligencja.",
        "Potrzebuję przepisu na pierogi ruskie dla czterech osób.",
    ],
    "tr": [
        "Bana İstanbul'da gezilecek en güzel yerleri önerir misin?",
        "Yapay zekanın eğitimde nasıl kullanılabileceğini açıklar mısın?",
        "Kısa bir doğum günü mesajı yazmama yardım eder misin?",
        "Evde kolayca yapılabilecek sağlıklı bir kahvaltı tarifi istiyorum.",
    ],
    "ja": [
        "東京で週末に行くべきおすすめの場所を教えてください。",
        "この文章をもっと丁寧な日本語に書き直してください。",
        "簡単に作れる夕食のレシピをいくつか教えてもらえますか。",
        "機械学習と深層学習の違いを分かりやすく説明してください。",
    ],
    "zh": [
        "请帮我写一封给老师的感谢信，内容要真诚一些。",
        "你能解释一下量子计算的基本原理吗？",
        "推荐几本适合初学者阅读的历史书籍。",
        "我想学习做饭，有什么简单的家常菜可以推荐？",
    ],
}


def accuracy(detect: Callable[[str], tuple[str, float] | None]) -> dict[str, tuple[int, int, float]]:
    """Per language: (right, total, mean confidence of the answers)."""
    out: dict[str, tuple[int, int, float]] = {}
    for lang, sentences in SAMPLE.items():
        answers = [detect(s) for s in sentences]
        right = sum(1 for a in answers if a is not None and a[0] == lang)
        confs = [a[1] for a in answers if a is not None]
        out[lang] = (right, len(sentences), sum(confs) / len(confs) if confs else 0.0)
    return out
