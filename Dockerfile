# ollamon: a transparent monitoring proxy for Ollama.
#   docker build -t ollamon .
#   docker run -p 11435:11435 -v ollamon-data:/data -e OLLAMON_UPSTREAM=http://host.docker.internal:11434 ollamon
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OLLAMON_LISTEN=0.0.0.0:11435 \
    OLLAMON_DB=/data/ollamon.db \
    OLLAMON_CONFIG=/etc/ollamon/config.yaml

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY storage ./storage
COPY alerts ./alerts
RUN pip install . && useradd --system --uid 10001 --home-dir /data ollamon \
    && mkdir -p /data /etc/ollamon && chown ollamon /data
COPY config.yaml /etc/ollamon/config.yaml

USER ollamon
VOLUME ["/data"]
EXPOSE 11435
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:11435/ollamon/health', timeout=4).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["ollamon"]
CMD ["serve"]
