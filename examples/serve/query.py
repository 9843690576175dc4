"""Query peftkit serve with the official openai client: every served model at once, streamed
(start the server as in the README's Serving section)."""

from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
question = [{"role": "user", "content": "What color is the sky?"}]


def ask(model: str) -> str:
    stream = client.chat.completions.create(
        model=model, messages=question, max_tokens=24, temperature=0, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in stream)


models = [m.id for m in client.models.list()]
with ThreadPoolExecutor(len(models)) as pool:  # one batch, three adapters
    for model, text in zip(models, pool.map(ask, models), strict=True):
        print(f"{model:>22}: {text}")
