// TensorBoard event files written by gbmoe itself: TFRecord framing (length, masked CRC32C of
// the length, payload, masked CRC32C of the payload) around hand-encoded protobuf Event
// messages {wall_time, step, file_version | summary{value{tag, simple_value}}}. No TensorFlow
// and no protobuf code generation: scalars need only these few fields.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

namespace gbmoe {

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of bytes; crc32c("123456789") ==
/// 0xE3069283.
uint32_t crc32c(const std::string& bytes);

/// The TFRecord mask of a CRC: ((crc >> 15) | (crc << 17)) + 0xA282EAD8.
uint32_t masked_crc32c(const std::string& bytes);

/// One TFRecord: uint64 LE length, uint32 LE masked CRC of those 8 bytes, the payload, uint32 LE
/// masked CRC of the payload.
std::string tfrecord(const std::string& payload);

/// A serialized tensorflow.Event {wall_time = 1 (double), step = 2 (int64),
/// file_version = 3 (string)}.
std::string event_file_version(double wall_time, const std::string& version = "brain.Event:2");

/// A serialized tensorflow.Event {wall_time, step, summary = 5 {value = 1 {tag = 1 (string),
/// simple_value = 2 (float)}...}} holding one Summary.Value per scalar.
std::string event_scalars(double wall_time, int64_t step,
                          const std::vector<std::pair<std::string, double>>& scalars);

/// The numbers of one JSON object line (as metrics.jsonl holds) flattened to TensorBoard tags:
/// object keys joined by '/', list elements named layerN ("maxvio_global/layer0"); nulls,
/// strings and booleans are skipped, and so is the top-level "step". Throws naming the text on
/// malformed JSON.
///
/// Example:
///   json_scalars("{\"step\":3,\"loss\":2.5,\"eval\":{\"mi\":[0.1,0.2]}}")
///     == {{"loss", 2.5}, {"eval/mi/layer0", 0.1}, {"eval/mi/layer1", 0.2}}
std::vector<std::pair<std::string, double>> json_scalars(const std::string& json_line);

/// Appends scalar events to DIR/events.out.tfevents.<seconds>.<host>.gbmoe, a file TensorBoard
/// (and `wandb sync --sync-tensorboard`) reads. The first record is the file_version event.
/// Every add flushes, so a run killed midway leaves whole records.
///
/// Example:
///   TensorBoardWriter tb("runs/x/tb");
///   tb.add_scalars(10, {{"loss", 2.3}, {"lr", 1e-3}});
///   tb.add_json_line(metrics_line);  // the step and every number of a metrics.jsonl line
class TensorBoardWriter {
 public:
  explicit TensorBoardWriter(const std::string& dir);

  void add_scalars(int64_t step, const std::vector<std::pair<std::string, double>>& scalars);
  /// The line's "step" and json_scalars(line); throws when the line has no integer "step".
  void add_json_line(const std::string& json_line);

  const std::string& path() const { return path_; }

 private:
  void write(const std::string& event);

  std::string path_;
  std::ofstream out_;
};

}  // namespace gbmoe
