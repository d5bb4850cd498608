/* edgepack_util.h: what both edgepack-chat programs share (command line, JSON text, clocks, peak memory).
 * Included once, by edgepack-chat.c, after it defines EDGEPACK_RUNTIME (the runtime's name and version). */
#ifndef EDGEPACK_UTIL_H
#define EDGEPACK_UTIL_H

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PROGRAM "native/edgepack-chat"

typedef struct {
  const char* prompt;
  const char* system;
  const char* model;
  int raw, json, smoke, sample, threads, max_tokens, top_k, seed, has_seed;
  double temperature, top_p;
} Args;

typedef struct {
  char* data;
  size_t len, cap;
} Buf;

static inline void buf_add(Buf* b, const char* s, size_t n) {
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 256;
    while (cap < b->len + n + 1) cap *= 2;
    char* grown = realloc(b->data, cap);
    if (!grown) {
      fputs("error: out of memory\n", stderr);
      exit(1);
    }
    b->data = grown;
    b->cap = cap;
  }
  memcpy(b->data + b->len, s, n);
  b->len += n;
  b->data[b->len] = '\0';
}

static inline void buf_str(Buf* b, const char* s) { buf_add(b, s, strlen(s)); }

/* s as a JSON string literal (UTF-8 passes through; control characters are escaped) */
static inline void buf_json(Buf* b, const char* s) {
  buf_add(b, "\"", 1);
  for (const unsigned char* p = (const unsigned char*)s; *p; p++) {
    char esc[8];
    if (*p == '"' || *p == '\\') {
      esc[0] = '\\';
      esc[1] = (char)*p;
      buf_add(b, esc, 2);
    } else if (*p == '\n') {
      buf_str(b, "\\n");
    } else if (*p == '\r') {
      buf_str(b, "\\r");
    } else if (*p == '\t') {
      buf_str(b, "\\t");
    } else if (*p < 0x20) {
      snprintf(esc, sizeof esc, "\\u%04x", *p);
      buf_str(b, esc);
    } else {
      buf_add(b, (const char*)p, 1);
    }
  }
  buf_add(b, "\"", 1);
}

static inline void buf_fmt(Buf* b, const char* fmt, double v) {
  char num[64];
  snprintf(num, sizeof num, fmt, v);
  buf_str(b, num);
}

static inline double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* this process's own peak resident memory (VmHWM), in MB, as run.py reports it */
static inline double peak_rss_mb(void) {
  FILE* f = fopen("/proc/self/status", "r");
  char line[256];
  double mb = 0;
  if (!f) return 0;
  while (fgets(line, sizeof line, f)) {
    if (strncmp(line, "VmHWM:", 6) == 0) {
      mb = strtod(line + 6, NULL) / 1024.0;
      break;
    }
  }
  fclose(f);
  return mb;
}

static inline void usage(FILE* to) {
  fprintf(to,
          "usage: edgepack-chat --prompt TEXT [--system TEXT] [--raw] [--max-tokens N] [--json]\n"
          "                     [--sample] [--temperature T] [--top-p P] [--top-k K] [--seed S]\n"
          "                     [--threads N] [--model DIR]\n"
          "       edgepack-chat --smoke [--threads N] [--model DIR]\n"
          "Runs %s (%s) from C. --raw: no chat template. --json: one JSON document\n"
          "with run.py's keys. --smoke: the build's golden tokens, greedy, one JSON line. --model: the model\n"
          "folder (default: ../model beside this program's folder).\n",
          EDGEPACK_BUNDLE_NAME, EDGEPACK_RUNTIME);
}

static inline int number(const char* flag, const char* v, double* out) {
  char* end;
  errno = 0;
  *out = strtod(v, &end);
  if (errno || end == v || *end) {
    fprintf(stderr, "error: %s needs a number (got '%s')\n", flag, v);
    return 0;
  }
  return 1;
}

static inline int parse(int argc, char** argv, Args* a) {
  a->max_tokens = EDGEPACK_MAX_NEW_TOKENS;
  a->threads = EDGEPACK_THREADS;
  a->temperature = 0.7;
  a->top_p = 0.9;
  a->top_k = 50;
  for (int i = 1; i < argc; i++) {
    const char* f = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : NULL;
    double d;
    if (!strcmp(f, "--help") || !strcmp(f, "-h")) {
      usage(stdout);
      exit(0);
    } else if (!strcmp(f, "--raw")) {
      a->raw = 1;
    } else if (!strcmp(f, "--json")) {
      a->json = 1;
    } else if (!strcmp(f, "--smoke")) {
      a->smoke = 1;
    } else if (!strcmp(f, "--sample")) {
      a->sample = 1;
    } else if (!v) {
      fprintf(stderr, "error: %s needs a value (or is not an option of edgepack-chat)\n", f);
      return 0;
    } else if (!strcmp(f, "--prompt")) {
      a->prompt = argv[++i];
    } else if (!strcmp(f, "--system")) {
      a->system = argv[++i];
    } else if (!strcmp(f, "--model")) {
      a->model = argv[++i];
    } else if (!strcmp(f, "--max-tokens") || !strcmp(f, "--threads") || !strcmp(f, "--top-k") ||
               !strcmp(f, "--seed")) {
      if (!number(f, argv[++i], &d) || d != (double)(long)d || d < INT_MIN || d > INT_MAX) {
        fprintf(stderr, "error: %s needs a whole number\n", f);
        return 0;
      }
      if (!strcmp(f, "--max-tokens")) a->max_tokens = (int)d;
      if (!strcmp(f, "--threads")) a->threads = (int)d;
      if (!strcmp(f, "--top-k")) a->top_k = (int)d;
      if (!strcmp(f, "--seed")) a->seed = (int)d, a->has_seed = 1;
    } else if (!strcmp(f, "--temperature")) {
      if (!number(f, argv[++i], &a->temperature)) return 0;
    } else if (!strcmp(f, "--top-p")) {
      if (!number(f, argv[++i], &a->top_p)) return 0;
    } else {
      fprintf(stderr, "error: unknown option %s\n", f);
      return 0;
    }
  }
  if (!a->smoke && !a->prompt) {
    fputs("error: --prompt is required (or --smoke)\n", stderr);
    return 0;
  }
  if (a->max_tokens < 1) {
    fprintf(stderr, "error: max_tokens must be at least 1 (got %d)\n", a->max_tokens);
    return 0;
  }
  return 1;
}

/* the model folder: --model, else ../model beside the folder this program is in */
static inline char* model_dir(const Args* a) {
  static char path[PATH_MAX + 16];
  if (a->model) return (char*)a->model;
  ssize_t n = readlink("/proc/self/exe", path, PATH_MAX);
  if (n <= 0) return "model";
  path[n] = '\0';
  char* slash = strrchr(path, '/');
  if (slash) *slash = '\0';
  strcat(path, "/../model");
  return path;
}

static inline void buf_tokens(Buf* b, const int32_t* t, int n) {
  buf_str(b, "[");
  for (int i = 0; i < n; i++) buf_fmt(b, i ? ", %.0f" : "%.0f", t[i]);
  buf_str(b, "]");
}

static inline void buf_rate(Buf* b, double v) {
  if (v < 0)
    buf_str(b, "null");
  else
    buf_fmt(b, "%.2f", v);
}

/* appends s to a JSON list being written ("[" already in it) */
static inline void buf_item(Buf* list, const char* s) {
  if (list->len > 1) buf_str(list, ", ");
  buf_json(list, s);
}

/* ends a reply's JSON document with the keys every runtime's run.py gives after its own, and prints it */
static inline void print_reply(Buf* out, int n, double prefill_ms, double tokens_per_s, const char* stopped,
                               double load_s) {
  buf_fmt(out, ", \"new_tokens\": %.0f", n);
  buf_fmt(out, ", \"prefill_ms\": %.2f, \"decode_tokens_per_s\": ", prefill_ms);
  buf_rate(out, tokens_per_s);
  buf_str(out, ", \"stopped\": ");
  buf_json(out, stopped);
  buf_fmt(out, ", \"load_s\": %.3f", load_s);
  buf_fmt(out, ", \"peak_rss_mb\": %.1f, \"bundle\": ", peak_rss_mb());
  buf_json(out, EDGEPACK_BUNDLE_NAME);
  buf_str(out, ", \"adapter\": null, \"program\": \"" PROGRAM "\"}\n");
  fputs(out->data, stdout);
  free(out->data);
}

/* after a streamed reply: its end on stdout, the numbers on stderr (as run.py) */
static inline void print_summary(int n, double prefill_ms, double tokens_per_s) {
  fputs("\n", stdout);
  fprintf(stderr, "[%d tokens, prefill %.2f ms, %.2f tok/s, peak RSS %.1f MB]\n", n, prefill_ms,
          tokens_per_s < 0 ? 0 : tokens_per_s, peak_rss_mb());
}

/* ends a smoke result (its runtime's golden keys already in `out`) with the keys every runtime gives; prints it */
static inline void print_smoke(Buf* out, int n, double tokens_per_s, double prefill_ms, const char* problems_json) {
  buf_fmt(out, ", \"tokens\": %.0f, \"tokens_per_s\": ", n);
  buf_rate(out, tokens_per_s);
  buf_fmt(out, ", \"prefill_ms\": %.2f", prefill_ms);
  buf_fmt(out, ", \"peak_rss_mb\": %.1f, \"problems\": ", peak_rss_mb());
  buf_str(out, problems_json);
  buf_str(out, ", \"program\": \"" PROGRAM "\"}\n");
  fputs(out->data, stdout);
  free(out->data);
}

#endif /* EDGEPACK_UTIL_H */
