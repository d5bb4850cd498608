/* edgepack_litert_lm.h: the part of LiteRT-LM's C API that edgepack-chat uses.
 *
 * Written for edgepack from the C API that liblitert-lm.so exports and litert-lm-api's Python bindings declare
 * (litert_lm/_ffi.py, Apache-2.0), declaring only what the sample calls. It matches LiteRT-LM 0.18 (the
 * liblitert-lm.so beside it; edgepack.json "native" names the exact version and sha256).
 *
 * Conventions: every object is opaque. Creators return NULL on failure, int functions 0 on success. Streaming
 * calls return at once and deliver chunks to the callback from a thread of the library, the last one with
 * is_final set (an error chunk is final too); the chunk and its strings live only during the callback.
 */
#ifndef EDGEPACK_LITERT_LM_H
#define EDGEPACK_LITERT_LM_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EDGEPACK_LITERT_LM_VERSION "0.18"

typedef struct LiteRtLmEngineSettings LiteRtLmEngineSettings;
typedef struct LiteRtLmEngine LiteRtLmEngine;
typedef struct LiteRtLmSamplerParams LiteRtLmSamplerParams;
typedef struct LiteRtLmSessionConfig LiteRtLmSessionConfig;
typedef struct LiteRtLmSession LiteRtLmSession;
typedef struct LiteRtLmInputData LiteRtLmInputData;
typedef struct LiteRtLmStreamChunk LiteRtLmStreamChunk;
typedef struct LiteRtLmConversationConfig LiteRtLmConversationConfig;
typedef struct LiteRtLmConversation LiteRtLmConversation;
typedef struct LiteRtLmConversationOptionalArgs LiteRtLmConversationOptionalArgs;
typedef struct LiteRtLmTokenizeResult LiteRtLmTokenizeResult;
typedef struct LiteRtLmDetokenizeResult LiteRtLmDetokenizeResult;

enum { LITERT_LM_LOG_ERROR = 4 };
enum { LITERT_LM_INPUT_TEXT = 0 };
enum { LITERT_LM_SAMPLER_TOP_K = 1, LITERT_LM_SAMPLER_TOP_P = 2 };

void litert_lm_set_min_log_level(int level);

/* an engine for a .litertlm file; backend "cpu" */
LiteRtLmEngineSettings* litert_lm_engine_settings_create(const char* model_path, const char* backend,
                                                         const char* vision_backend, const char* audio_backend);
void litert_lm_engine_settings_set_num_threads(LiteRtLmEngineSettings* settings, int num_threads);
void litert_lm_engine_settings_set_cache_dir(LiteRtLmEngineSettings* settings, const char* cache_dir);
void litert_lm_engine_settings_delete(LiteRtLmEngineSettings* settings);
LiteRtLmEngine* litert_lm_engine_create(LiteRtLmEngineSettings* settings);
void litert_lm_engine_delete(LiteRtLmEngine* engine);

/* token ids of a text, and the text of ids; the results own what they return */
LiteRtLmTokenizeResult* litert_lm_engine_tokenize(LiteRtLmEngine* engine, const char* text);
const int* litert_lm_tokenize_result_get_tokens(const LiteRtLmTokenizeResult* result);
size_t litert_lm_tokenize_result_get_num_tokens(const LiteRtLmTokenizeResult* result);
void litert_lm_tokenize_result_delete(LiteRtLmTokenizeResult* result);
LiteRtLmDetokenizeResult* litert_lm_engine_detokenize(LiteRtLmEngine* engine, const int* ids, size_t count);
const char* litert_lm_detokenize_result_get_string(const LiteRtLmDetokenizeResult* result);
void litert_lm_detokenize_result_delete(LiteRtLmDetokenizeResult* result);

/* sampling: greedy is TOP_P with top_k 1 (as litert-lm-api's SamplerConfig(top_k=1)) */
LiteRtLmSamplerParams* litert_lm_sampler_params_create(int sampler_type);
void litert_lm_sampler_params_set_top_k(LiteRtLmSamplerParams* params, int top_k);
void litert_lm_sampler_params_set_top_p(LiteRtLmSamplerParams* params, float top_p);
void litert_lm_sampler_params_set_temperature(LiteRtLmSamplerParams* params, float temperature);
void litert_lm_sampler_params_set_seed(LiteRtLmSamplerParams* params, int seed);
void litert_lm_sampler_params_delete(LiteRtLmSamplerParams* params);

/* a session: raw text in (no chat template), tokens out; the config is copied by create_session */
LiteRtLmSessionConfig* litert_lm_session_config_create(void);
void litert_lm_session_config_set_apply_prompt_template(LiteRtLmSessionConfig* config, bool apply);
void litert_lm_session_config_set_sampler_params(LiteRtLmSessionConfig* config, const LiteRtLmSamplerParams* p);
void litert_lm_session_config_set_max_output_tokens(LiteRtLmSessionConfig* config, int max_output_tokens);
void litert_lm_session_config_delete(LiteRtLmSessionConfig* config);
LiteRtLmSession* litert_lm_engine_create_session(LiteRtLmEngine* engine, LiteRtLmSessionConfig* config);
void litert_lm_session_delete(LiteRtLmSession* session);
LiteRtLmInputData* litert_lm_input_data_create(int type, const void* data, size_t size);
void litert_lm_input_data_delete(LiteRtLmInputData* input);
int litert_lm_session_run_prefill(LiteRtLmSession* session, LiteRtLmInputData** inputs, size_t count);

/* streaming: one chunk per token (a session's is plain text; a conversation's is a JSON message) */
typedef void (*LiteRtLmStreamCallback)(void* user_data, const LiteRtLmStreamChunk* chunk);
int litert_lm_session_run_decode_async(LiteRtLmSession* session, LiteRtLmStreamCallback callback, void* user_data);
const char* litert_lm_stream_chunk_get_text(const LiteRtLmStreamChunk* chunk);
bool litert_lm_stream_chunk_is_final(const LiteRtLmStreamChunk* chunk);
const char* litert_lm_stream_chunk_get_error(const LiteRtLmStreamChunk* chunk);

/* a conversation: the model's own chat template, a system message, messages as JSON */
LiteRtLmConversationConfig* litert_lm_conversation_config_create(void);
void litert_lm_conversation_config_set_session_config(LiteRtLmConversationConfig* config,
                                                      LiteRtLmSessionConfig* session_config);
void litert_lm_conversation_config_set_system_message(LiteRtLmConversationConfig* config, const char* text);
void litert_lm_conversation_config_delete(LiteRtLmConversationConfig* config);
LiteRtLmConversation* litert_lm_conversation_create(LiteRtLmEngine* engine, LiteRtLmConversationConfig* config);
void litert_lm_conversation_delete(LiteRtLmConversation* conversation);
int litert_lm_conversation_send_message_stream(LiteRtLmConversation* conversation, const char* message_json,
                                               const char* extra_context_json,
                                               LiteRtLmConversationOptionalArgs* optional_args,
                                               LiteRtLmStreamCallback callback, void* user_data);

#ifdef __cplusplus
}
#endif
#endif /* EDGEPACK_LITERT_LM_H */
