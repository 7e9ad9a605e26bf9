// TensorBoard writer: CRC32C check values, TFRecord framing, the protobuf bytes of an Event, and
// the flattening of metrics lines into tags. (tests/scripts/tensorboard_trace_test.py reads the
// files of a real run with TensorBoard's own reader.)
#include "train/tensorboard.h"

#include <gtest/gtest.h>

#include <cstring>

namespace gbmoe {
namespace {

TEST(TensorBoard, Crc32cCheckValues) {
  EXPECT_EQ(crc32c("123456789"), 0xE3069283u);  // the CRC-32C check value
  EXPECT_EQ(crc32c(""), 0u);
  EXPECT_EQ(crc32c(std::string(32, '\0')), 0x8A9136AAu);  // RFC 3720 B.4: 32 bytes of zeros
  EXPECT_EQ(crc32c(std::string(32, '\xff')), 0x62A8AB43u);
  const uint32_t c = crc32c("abc");
  EXPECT_EQ(masked_crc32c("abc"), ((c >> 15) | (c << 17)) + 0xA282EAD8u);
}

TEST(TensorBoard, RecordFraming) {
  const std::string payload = "hello";
  const auto r = tfrecord(payload);
  ASSERT_EQ(r.size(), 8 + 4 + payload.size() + 4);
  uint64_t length = 0;
  std::memcpy(&length, r.data(), 8);
  EXPECT_EQ(length, payload.size());
  uint32_t length_crc = 0, data_crc = 0;
  std::memcpy(&length_crc, r.data() + 8, 4);
  std::memcpy(&data_crc, r.data() + 12 + payload.size(), 4);
  EXPECT_EQ(length_crc, masked_crc32c(r.substr(0, 8)));
  EXPECT_EQ(r.substr(12, payload.size()), payload);
  EXPECT_EQ(data_crc, masked_crc32c(payload));
}

TEST(TensorBoard, EventWireFormat) {
  // Event{wall_time: 1.5, step: 300, summary{value{tag: "a", simple_value: 2.0}}}, encoded by
  // hand from the protobuf rules.
  const std::string expected(
      "\x09\x00\x00\x00\x00\x00\x00\xf8\x3f"  // field 1, fixed64: 1.5
      "\x10\xac\x02"                          // field 2, varint: 300
      "\x2a\x0a"                              // field 5 (summary), 10 bytes
      "\x0a\x08"                              // Summary.value, 8 bytes
      "\x0a\x01"
      "a"                      // Value.tag
      "\x15\x00\x00\x00\x40",  // Value.simple_value, fixed32: 2.0f
      24);
  EXPECT_EQ(event_scalars(1.5, 300, {{"a", 2.0}}), expected);
  const std::string version(
      "\x09\x00\x00\x00\x00\x00\x00\xf8\x3f\x1a\x0d"
      "brain.Event:2",
      24);
  EXPECT_EQ(event_file_version(1.5), version);
}

TEST(TensorBoard, JsonLinesFlattenToTags) {
  const auto s = json_scalars(
      "{\"step\":4,\"loss\":2.5,\"lr\":1e-3,\"maxvio_global\":[0.25,null,1],"
      "\"eval\":{\"domains\":{\"en\":3.5}},\"name\":\"x\",\"on\":true}");
  const std::vector<std::pair<std::string, double>> expected{{"loss", 2.5},
                                                             {"lr", 1e-3},
                                                             {"maxvio_global/layer0", 0.25},
                                                             {"maxvio_global/layer2", 1.0},
                                                             {"eval/domains/en", 3.5}};
  EXPECT_EQ(s, expected);
  EXPECT_THROW(json_scalars("{\"step\":1,\"loss\":}"), std::invalid_argument);
  EXPECT_THROW(json_scalars("{\"loss\":1"), std::invalid_argument);
}

}  // namespace
}  // namespace gbmoe
