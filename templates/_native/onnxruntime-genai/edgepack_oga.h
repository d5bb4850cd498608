/* edgepack_oga.h: the part of onnxruntime-genai's C API that edgepack-chat uses.
 *
 * Written for edgepack from the runtime's documented C API (onnxruntime-genai's ort_genai_c.h, MIT licensed),
 * declaring only what the sample calls. It matches onnxruntime-genai 0.18 (the libonnxruntime-genai.so beside it;
 * edgepack.json "native" names the exact version and sha256). For the whole API, use the header of the same
 * release: https://github.com/microsoft/onnxruntime-genai/blob/v0.18.0/src/ort_genai_c.h
 *
 * Conventions: every call that can fail returns an OgaResult* (NULL on success; else read OgaResultGetError and
 * free it with OgaDestroyResult). Strings the library returns are freed with OgaDestroyString. The API is not
 * thread safe: one thread per OgaGenerator.
 */
#ifndef EDGEPACK_OGA_H
#define EDGEPACK_OGA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EDGEPACK_OGA_VERSION "0.18"

typedef struct OgaResult OgaResult;
typedef struct OgaConfig OgaConfig;
typedef struct OgaModel OgaModel;
typedef struct OgaTokenizer OgaTokenizer;
typedef struct OgaTokenizerStream OgaTokenizerStream;
typedef struct OgaSequences OgaSequences;
typedef struct OgaGeneratorParams OgaGeneratorParams;
typedef struct OgaGenerator OgaGenerator;

/* results and strings */
const char* OgaResultGetError(const OgaResult* result);
void OgaDestroyResult(OgaResult* result);
void OgaDestroyString(const char* str);
void OgaShutdown(void);

/* a model: its folder's genai_config.json, optionally overlaid with JSON (session options, say) */
OgaResult* OgaCreateConfig(const char* config_path, OgaConfig** out);
OgaResult* OgaConfigOverlay(OgaConfig* config, const char* json);
void OgaDestroyConfig(OgaConfig* config);
OgaResult* OgaCreateModelFromConfig(const OgaConfig* config, OgaModel** out);
void OgaDestroyModel(OgaModel* model);

/* the model's tokenizer; template_str NULL: the model's own chat template; tools may be NULL */
OgaResult* OgaCreateTokenizer(const OgaModel* model, OgaTokenizer** out);
void OgaDestroyTokenizer(OgaTokenizer* tokenizer);
OgaResult* OgaTokenizerApplyChatTemplate(const OgaTokenizer* tokenizer, const char* template_str,
                                         const char* messages_json, const char* tools, bool add_generation_prompt,
                                         const char** out_string);
OgaResult* OgaTokenizerEncode(const OgaTokenizer* tokenizer, const char* str, OgaSequences* sequences);
OgaResult* OgaCreateTokenizerStream(const OgaTokenizer* tokenizer, OgaTokenizerStream** out);
void OgaDestroyTokenizerStream(OgaTokenizerStream* stream);
/* the text a token adds (may be empty until a multi-byte character completes); valid until the next call */
OgaResult* OgaTokenizerStreamDecode(OgaTokenizerStream* stream, int32_t token, const char** out);

/* token sequences */
OgaResult* OgaCreateSequences(OgaSequences** out);
void OgaDestroySequences(OgaSequences* sequences);
size_t OgaSequencesGetSequenceCount(const OgaSequences* sequences, size_t sequence_index);
const int32_t* OgaSequencesGetSequenceData(const OgaSequences* sequences, size_t sequence_index);

/* generation: search options by name ("max_length", "do_sample", "temperature", "top_p", "top_k", "random_seed") */
OgaResult* OgaCreateGeneratorParams(const OgaModel* model, OgaGeneratorParams** out);
void OgaDestroyGeneratorParams(OgaGeneratorParams* params);
OgaResult* OgaGeneratorParamsSetSearchNumber(OgaGeneratorParams* params, const char* name, double value);
OgaResult* OgaGeneratorParamsSetSearchBool(OgaGeneratorParams* params, const char* name, bool value);
OgaResult* OgaCreateGenerator(const OgaModel* model, const OgaGeneratorParams* params, OgaGenerator** out);
void OgaDestroyGenerator(OgaGenerator* generator);
OgaResult* OgaGenerator_AppendTokens(OgaGenerator* generator, const int32_t* input_ids, size_t input_ids_count);
OgaResult* OgaGenerator_GenerateNextToken(OgaGenerator* generator);
OgaResult* OgaGenerator_GetNextTokens(const OgaGenerator* generator, const int32_t** out, size_t* out_count);
bool OgaGenerator_IsDone(OgaGenerator* generator);
/* back to new_length tokens (prompt included), to continue from there */
OgaResult* OgaGenerator_RewindTo(OgaGenerator* generator, size_t new_length);

#ifdef __cplusplus
}
#endif
#endif /* EDGEPACK_OGA_H */
